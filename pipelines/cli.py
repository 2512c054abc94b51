"""`genforge`: what users do outside the stages.

    genforge generate MODEL [--class NAME|ID ...] [-n 8] [--seed 0] [-o grid.png]   one row per class
    genforge champions [--json]                      each family's champion, flagged if the gate did not crown it
    genforge promote VERSION [--family gan] [--override REASON]   a person's promotion, through the gate or recorded past it

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
    generate.add_argument("--sampler", help="ldm only: ddpm | ddim | dpmsolver++ (default: the model's)")
    generate.add_argument("--steps", type=int, help="ldm only: sampler steps (default: the model's)")
    generate.add_argument("--guidance", type=float, help="ldm only: classifier-free guidance scale (default: the model's)")
    generate.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    champions = commands.add_parser("champions", parents=[common], help="each family's champion")
    champions.add_argument("--json", action="store_true", help="one JSON object per family instead of text")
    promoted = commands.add_parser("promote", parents=[common], help="promote a registered version: through the gate, or past it with --override")
    promoted.add_argument("version", metavar="VERSION", help="the version number")
    promoted.add_argument("--family", choices=FAMILIES, default="gan", help="model family (default: gan)")
    promoted.add_argument("--override", metavar="REASON", help="promote whatever the gate says; REASON is recorded on the version")
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
    if not requested:
        return list(range(num_classes))
    lowered = {name.lower(): i for i, name in enumerate(names)}
    ids = []
    for item in (part.strip() for value in requested for part in value.split(",") if part.strip()):
        if item.lower() in lowered:
            ids.append(lowered[item.lower()])
        elif item.isdigit() and int(item) < num_classes:
            ids.append(int(item))
        else:
            known = ", ".join(f"{i} {n}" for i, n in enumerate(names)) if names else f"ids 0..{num_classes - 1}"
            raise StageError(f"--class {item}: not a class of this model ({known})")
    return ids


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


COMMANDS = {"generate": generate, "champions": champions, "promote": promote_command}


if __name__ == "__main__":
    main()
