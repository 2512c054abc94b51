"""`genforge`: what users do outside the stages.

    genforge generate MODEL [--class NAME|ID ...] [-n 8] [--seed 0] [-o grid.png]   one row per class
    genforge champions [--json]                      each family's champion, flagged if the gate did not crown it
    genforge promote VERSION [--family gan] [--override REASON]   a person's promotion, through the gate or recorded past it
    genforge serve MODEL_URI [--port 5001]           MLflow's scoring server for a registered version (REST, 127.0.0.1)

MODEL is an exported model directory (models/gan) or a registered version (models:/genforge-gan@champion,
models:/genforge-ldm/3). Every subcommand reads the params file (--params, --overlay, --set, as the stages do)
for the tracking store, the registered model names, the alias and the gate. Errors are one line, exit 2;
`promote` exits 1 when the gate rejects the version.
"""

from __future__ import annotations

import argparse
import json
import sys

from gen_core.config import RunConfig
from gen_core.io import atomic_write_bytes
from pipelines.common import StageError, run_stage, stage_parser
from pipelines.registry import OVERRIDE, OVERRIDE_AT, OVERRIDE_BY, OVERRIDE_REASON, gate_record, criteria, load_registered_generator, promote
from pipelines.tracking import connect, server_calls, tracking_uri

FAMILIES = ("gan", "ldm")


def parser() -> argparse.ArgumentParser:
    common = stage_parser("", add_help=False)
    top = argparse.ArgumentParser(prog="genforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate = commands.add_parser("generate", parents=[common], help="sample a class grid from an exported or registered model")
    generate.add_argument("model", metavar="MODEL", help="a model directory (models/gan) or a models:/ URI")
    generate.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME|ID",
                          help="a class name or id, repeatable or comma-separated (default: every class)")  # fmt: skip
    generate.add_argument("-n", type=int, default=8, help="samples per class (default 8)")
    generate.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED+i (default 0)")
    generate.add_argument("-o", "--output", default="grid.png", help="PNG to write (default grid.png)")
    generate.add_argument("--sampler", help="ldm only: ddpm | ddim | dpmsolver++ | heun (default: the model's)")
    generate.add_argument("--steps", type=int, help="ldm only: sampler steps (default: the model's)")
    generate.add_argument("--guidance", type=float, help="ldm only: classifier-free guidance scale (default: the model's)")
    generate.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    champions = commands.add_parser("champions", parents=[common], help="each family's champion")
    champions.add_argument("--json", action="store_true", help="one JSON object per family instead of text")
    promoted = commands.add_parser("promote", parents=[common], help="promote a registered version: through the gate, or past it with --override")
    promoted.add_argument("version", metavar="VERSION", help="the version number")
    promoted.add_argument("--family", choices=FAMILIES, default="gan", help="model family (default: gan)")
    promoted.add_argument("--override", metavar="REASON", help="promote whatever the gate says; REASON is recorded on the version")
    served = commands.add_parser("serve", parents=[common], help="serve a registered version over REST (MLflow's scoring protocol)")
    served.add_argument("model", metavar="MODEL_URI", help="a registered version: models:/genforge-gan@champion, models:/genforge-ldm/3")
    served.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    served.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    return top


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = ["genforge", *argv]
    run_stage("genforge", lambda cfg, args: COMMANDS[args.command](cfg, args), parser(), report_time=False)


# ---------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------


def generate(cfg: RunConfig, args: argparse.Namespace) -> int:
    import torch

    from gen_core.sampling import image_grid, png_bytes, to_uint8

    if args.n < 1:
        raise StageError(f"-n {args.n}: needs at least 1 sample per class")
    generator, meta = open_model(cfg, args.model)
    family = meta.get("family", "gan")
    options = {"sampler": args.sampler, "num_steps": args.steps, "guidance_scale": args.guidance}
    if family == "gan" and any(v is not None for v in options.values()):
        raise StageError("--sampler, --steps and --guidance apply to ldm models; this is a gan")
    names = meta.get("class_names") or []
    classes = class_ids(args.classes, names, generator.num_classes)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    labels = torch.tensor(classes).repeat_interleave(args.n)
    seeds = [args.seed + i for i in range(len(labels))]
    images = generator.to(device).sample(labels, seeds, device, **{k: v for k, v in options.items() if v is not None})
    atomic_write_bytes(args.output, png_bytes(image_grid(to_uint8(images.float().cpu()), rows=len(classes))))
    shown = ", ".join(names[c] if c < len(names) else str(c) for c in classes)
    print(f"wrote {args.output}: {len(classes)} rows ({shown}) x {args.n} samples, seeds {args.seed}..{seeds[-1]}, "
          f"{family} at step {meta.get('step', '?')} from {args.model}")  # fmt: skip
    return 0


def open_model(cfg: RunConfig, model: str):
    """A model directory or a models:/ URI -> (generator, generator.json)."""
    from gen_core.generators import load_image_generator

    if not model.startswith("models:/"):
        return load_image_generator(model)
    from mlflow.exceptions import MlflowException

    connect(cfg)
    with server_calls(tracking_uri(cfg), f"downloading {model}"):
        try:
            return load_registered_generator(model)
        except MlflowException as err:
            raise StageError(f"{model}: {str(err).splitlines()[0]}") from None


def class_ids(requested: list[str], names: list[str], num_classes: int) -> list[int]:
    """'sneaker', '7', 'T-shirt/top,Bag' -> class ids; nothing requested: every class. Names match
    case-insensitively; an unknown one is a one-line error listing the model's classes."""
    from gen_core.image_requests import RequestError, class_id

    if not requested:
        return list(range(num_classes))
    items = [part.strip() for value in requested for part in value.split(",") if part.strip()]
    try:
        return [class_id(item, names, num_classes, what=f"--class {item}") for item in items]
    except RequestError as err:
        raise StageError(str(err)) from None


# ---------------------------------------------------------------------------
# champions and promote
# ---------------------------------------------------------------------------


def champions(cfg: RunConfig, args: argparse.Namespace) -> int:
    mlflow = connect(cfg)
    with server_calls(tracking_uri(cfg), "reading the registry"):
        reports = [champion_report(mlflow.MlflowClient(), cfg, family) for family in FAMILIES]
    for report in reports:
        print(json.dumps(report, sort_keys=True) if args.json else champion_text(report))
    return 0


def champion_report(client, cfg: RunConfig, family: str) -> dict:
    """A family's champion: version, gated metrics, protocol, how it got the alias, and `flags` for
    anything a person should know (crowned outside the gate, another protocol, fails today's gate)."""
    from mlflow.exceptions import MlflowException

    gate, alias = getattr(cfg.registry, family), cfg.registry.alias
    report = {"family": family, "model_name": gate.model_name, "alias": alias, "version": None, "flags": []}
    try:
        number = client.get_registered_model(gate.model_name).aliases.get(alias)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        number = None
        report["flags"].append("not registered")
    if number is None:
        report["flags"] = report["flags"] or [f"no version holds @{alias}"]
        return report
    version = client.get_model_version(gate.model_name, str(number))
    tags, record = version.tags, gate_record(version)
    report.update(version=int(version.version), gate=tags.get("gate"), protocol=tags.get("protocol"), protocol_id=record["protocol_id"],
                  **{k: float(tags[k]) for k in ("fid", "floor_fid", "precision", "recall", "class_accuracy", "kid") if k in tags})  # fmt: skip
    if tags.get("gate") == OVERRIDE:
        report["flags"].append(f"promoted by override of {tags.get(OVERRIDE_BY)} at {tags.get(OVERRIDE_AT)}: {tags.get(OVERRIDE_REASON)}")
    elif tags.get("gate") != "promoted":
        rejected = f"; the gate said: {tags['rejected']}" if "rejected" in tags else ""
        report["flags"].append(f"not promoted by the gate (gate tag {tags.get('gate')!r}: the alias was moved outside it){rejected}")
    if tags.get("protocol") != cfg.evaluate.protocol:
        report["flags"].append(f"measured under protocol {tags.get('protocol')}, the current one is {cfg.evaluate.protocol}")
    failed = criteria(record, gate)[1]
    if failed:
        report["flags"].append(f"fails today's gate: {', '.join(failed)}")
    return report


def champion_text(report: dict) -> str:
    head = f"{report['family']}: {report['model_name']}@{report['alias']}"
    if report["version"] is None:
        return f"{head}: none ({', '.join(report['flags'])})"
    metrics = "  ".join(f"{k} {report[k]:.3f}" for k in ("fid", "precision", "recall", "class_accuracy") if k in report)
    floor = f" (floor {report['floor_fid']:.2f})" if "floor_fid" in report else ""
    lines = [f"{head} = v{report['version']}  {metrics}{floor}  protocol {report.get('protocol_id')}  gate: {report.get('gate')}"]
    return "\n".join(lines + [f"  WARNING {flag}" for flag in report["flags"]])


def promote_command(cfg: RunConfig, args: argparse.Namespace) -> int:
    record = promote(cfg, args.family, args.version, args.override)
    verdict = "OVERRIDE" if args.override is not None else ("PROMOTED" if record["promoted"] else "REJECTED")
    print(f"gate: {verdict} {record['model_name']} v{record['version']}: {record['reason']}", flush=True)
    if args.override is not None and record["criteria_failed"]:
        print(f"  past the gate's criteria: {', '.join(record['criteria_failed'])}", flush=True)
    return 0 if record["promoted"] else 1


# ---------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------


def serve(cfg: RunConfig, args: argparse.Namespace) -> int:
    """MLflow's own scoring server (the app `mlflow models serve` runs: POST /invocations, GET /ping, /version) for a
    registered version, in this process: no `uvicorn` needed on PATH. Errors a request causes come back as one line,
    {"error_code": ..., "message": ...}, never with a traceback; the server stays up. serving.max_images caps a request."""
    import os

    import uvicorn
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import load_model, scoring_server

    if not args.model.startswith("models:/"):
        raise StageError(f"{args.model}: serve takes a registered version (models:/<name>@<alias> or models:/<name>/<version>)")
    os.environ["GENFORGE_MAX_IMAGES"] = str(cfg.serving.max_images)
    connect(cfg)
    with server_calls(tracking_uri(cfg), f"loading {args.model}"):
        try:
            model = load_model(args.model)  # the registered "model from code": pipelines/mlflow_model.py + safetensors, no pickle
        except MlflowException as err:
            raise StageError(f"{args.model}: {str(err).splitlines()[0]}") from None
    app = scoring_server.init(model)
    app.middleware("http")(one_line_errors)
    print(f"serving {args.model} on http://{args.host}:{args.port}/invocations (max {cfg.serving.max_images} images a request)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


async def one_line_errors(request, call_next):
    """A 4xx/5xx from the scoring server -> {"error_code", "message"} with the message's one meaningful line: MLflow
    wraps a model's error as "Failed to predict data '<the whole input>'. \nError: <message>" and may attach a traceback."""
    from fastapi.responses import JSONResponse

    from gen_core.image_requests import DEFAULTS

    if request.url.path == "/invocations":  # MLflow drops settings its params schema does not know: say so instead
        try:
            given = json.loads(await request.body()).get("params") or {}
        except (ValueError, AttributeError):
            given = {}
        unknown = sorted(set(given) - set(DEFAULTS)) if isinstance(given, dict) else []
        if unknown:
            message = f"unknown setting {unknown[0]!r} in params (settings: {', '.join(DEFAULTS)})"
            return JSONResponse({"error_code": "INVALID_PARAMETER_VALUE", "message": message}, status_code=400)
    response = await call_next(request)
    if response.status_code < 400:
        return response
    body = b"".join([chunk async for chunk in response.body_iterator])
    try:
        payload = json.loads(body)
    except ValueError:
        payload = {"message": body.decode(errors="replace")}
    message = str(payload.get("message", ""))
    message = message.split("\nError: ", 1)[-1].strip()
    line = message.splitlines()[0] if message else f"HTTP {response.status_code}"
    return JSONResponse({"error_code": payload.get("error_code", "BAD_REQUEST"), "message": line}, status_code=response.status_code)


COMMANDS = {"generate": generate, "champions": champions, "promote": promote_command, "serve": serve}


if __name__ == "__main__":
    main()
