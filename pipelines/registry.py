"""The model registry: an MLflow model version per exported generator and the gate on the `champion` alias.

Each family has its own registered model (registry.<family>.model_name). A version passes the gate if
FID <= registry.<family>.fid_threshold, recall >= recall_floor and class accuracy >= class_accuracy_floor,
measured under the evaluation protocol in use (a champion measured under another is not compared: one
line, exit 2). The alias moves to a passing version only if its FID is strictly better than the champion's;
a version that does not get it is tagged `rejected` with every failed criterion.

Correct under concurrency without a lock (MLflow has no compare-and-set on aliases):
- Idempotency key: the generator's sha256, tagged when the version is created. Registering the same
  generator again returns its version; two processes that create one at the same time both end on the
  lowest-numbered one (the other is deleted by its maker).
- Created measured: a version is created with all its tags (sha256 and the gate's metrics) in one registry
  write, so a process that reads the registry after creating its own version sees every earlier version's
  metrics. Without that, a better version created first but tagged a moment later was invisible to a worse
  one's gate, which promoted itself and printed PROMOTED before the better one took the alias back.
- A converging rule: after tagging its version, a process computes the champion from the registry's
  contents alone (`converge`: the passing version with the lowest FID, or the champion if none beats it),
  moves the alias if needed and re-reads until a read confirms it. Whichever process moves last also reads
  last, so every run ends with the best passing version as champion, whatever the interleaving. A version
  that prints PROMOTED was the best that existed when it was created; only a version created after it
  can displace it.
A version tagged `revoked` (any value) never wins: the way to retire a champion is to tag it and rerun register.
A person can promote outside the gate only through `promote(..., override=REASON)` (`genforge promote`):
the version is tagged gate=override with the reason, who and when, and is pinned: registrations leave it in
place (and say so) until `promote` is run again. Used by the register stage, the sweep for its best trial
and the `genforge` command.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from gen_core.config import GateConfig, RunConfig
from gen_core.generators import PAIRED_KEYS, generator_digest, load_image_generator, read_generator_meta, weight_files
from gen_core.io import atomic_write_json
from pipelines.common import REPO_ROOT, StageError
from pipelines.tracking import connect, server_calls, tracking_uri, training_run

MODEL_CODE = REPO_ROOT / "pipelines" / "mlflow_model.py"
# explicit: inferring them takes ~8 s
PIP_REQUIREMENTS = ["torch==2.14.1", "diffusers==0.42.1", "safetensors", "numpy", "fsspec", "pandas", "pydantic>=2.6", "pyyaml"]
# A version a person promoted past the gate (`promote(..., override=REASON)`): tag gate=override, plus these.
OVERRIDE, OVERRIDE_REASON, OVERRIDE_BY, OVERRIDE_AT = "override", "gate_override", "gate_override_by", "gate_override_at"


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str


def criteria(record: dict, gate: GateConfig) -> tuple[list[str], list[str]]:
    """The gate's own criteria for one model (its fid, recall, class_accuracy) -> (held, failed), as text."""
    held, failed = [], []
    fid = record["fid"]
    if not math.isfinite(fid):
        failed.append(f"fid {fid} is not finite")
    else:
        (held if fid <= gate.fid_threshold else failed).append(f"fid {fid:.2f} {'<=' if fid <= gate.fid_threshold else '>'} threshold {gate.fid_threshold:.2f}")
    for key, floor in (("recall", gate.recall_floor), ("class_accuracy", gate.class_accuracy_floor)):
        value = record[key]
        (held if value >= floor else failed).append(f"{key} {value:.3f} {'>=' if value >= floor else '<'} floor {floor:.3f}")
    return held, failed


def decide(metrics: dict, gate: GateConfig, champion: dict | None) -> GateDecision:
    """Pure gate: promote iff FID is finite and at or below the threshold, recall and class accuracy are at
    or above their floors, and FID is strictly better than the champion's, unless the champion itself
    fails this gate (a champion crowned before a floor existed is replaced by any model that passes).
    The reason names every criterion that failed (or, on promotion, every one that held). `champion`
    (its version, fid, protocol_id and, if known, recall and class_accuracy) must have been measured
    under the candidate's protocol: comparing across protocols is refused."""
    if champion is not None and champion.get("protocol_id") != metrics["protocol_id"]:
        raise StageError(
            f"gate: champion v{champion['version']} was measured under protocol {champion.get('protocol_id') or '(none recorded)'}, "
            f"this model under {metrics['protocol_id']}: not comparable; set evaluate.protocol to the champion's, or re-evaluate the champion"
        )
    held, failed = criteria(metrics, gate)
    fid = metrics["fid"]
    champion_fails = criteria({"recall": 1.0, "class_accuracy": 1.0, **champion}, gate)[1] if champion else []
    if champion is None:
        held.append("no previous champion")
    elif champion_fails:
        held.append(f"champion v{champion['version']} fails this gate ({', '.join(champion_fails)})")
    elif math.isfinite(fid) and fid < champion["fid"]:
        held.append(f"better than champion's {champion['fid']:.2f}")
    else:
        failed.append(f"fid {fid:.2f} is not better than champion's {champion['fid']:.2f}")
    return GateDecision(not failed, ", ".join(failed or held))


MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def champion_uri(cfg: RunConfig, family: str) -> str:
    """models:/<registry.<family>.model_name>@<registry.alias>"""
    return f"models:/{getattr(cfg.registry, family).model_name}@{cfg.registry.alias}"


def registered_version(client, model_uri: str, option: str = "--model"):
    """models:/<name>@<alias> or models:/<name>/<version> -> the MLflow ModelVersion (one-line errors naming `option`)."""
    from mlflow.exceptions import MlflowException

    match = MODEL_URI.match(model_uri)
    if match is None:
        raise StageError(f"{option} {model_uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    name = match["name"]
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(name, match["alias"])
        return client.get_model_version(name, match["version"])
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise StageError(f"{option} {model_uri}: {str(err).splitlines()[0]}") from None
        raise


def load_registered_generator(model_uri: str):
    """Build a generator (GAN or diffusion) from a registered version, e.g. models:/genforge-ldm@champion,
    using only its safetensors weights and JSON configs: no code from the registry is executed.
    -> (generator, its generator.json)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/artifacts/generator", dst_path=tmp)
        return load_image_generator(local)


def register(cfg: RunConfig, family: str = "gan", require_promotion: bool = False) -> dict:
    """Register the family's exported generator (idempotent), tag it with its metrics and let the gate
    decide about the alias -> the decision record, also written to <registry.out_dir>/<family>.json."""
    r = cfg.registry
    gate = getattr(r, family)
    generator_dir = Path(cfg.generator_dir(family))
    gen_meta = read_generator_meta(generator_dir)
    metrics = _evaluation(cfg, family, gen_meta)
    generator_sha256 = generator_digest(generator_dir)

    mlflow = connect(cfg)
    with server_calls(tracking_uri(cfg), f"registering {generator_dir} as {gate.model_name} (rerun register: it is idempotent)"):
        client = mlflow.MlflowClient()
        run_id = training_run(mlflow, gen_meta.get("mlflow_run_id"), generator_dir)
        _ensure_registered_model(client, gate.model_name, family)
        tags = _version_tags(metrics, gen_meta, run_id, generator_sha256, family, gate)
        version = _version_of(client, gate.model_name, generator_sha256)
        if version is None:
            print(f"registering {generator_dir} (sha256 {generator_sha256[:12]}) as a new version of {gate.model_name}", flush=True)
            version = _log_version(mlflow, client, gate.model_name, generator_dir, run_id, tags)
        for key, value in tags.items():  # a version just made has them all; an existing (or concurrently kept) one gets what differs
            if version.tags.get(key) != value:
                _write(client.set_model_version_tag, gate.model_name, version.version, key, value)
        decision = _apply_gate(client, gate, r.alias, str(version.version), metrics)  # a str over REST, an int from sqlite
        card = model_card(family, metrics, gen_meta, gate, decision, run_id)
        _write(client.update_model_version, gate.model_name, version.version, card)

    verdict = "PROMOTED" if decision.promoted else "REJECTED"
    line = f"gate: {verdict} {gate.model_name} v{version.version} -> @{r.alias}: {decision.reason}" if decision.promoted else (
        f"gate: {verdict} {gate.model_name} v{version.version}: {decision.reason}"
    )
    print(line, flush=True)
    record = {
        "model_name": gate.model_name, "version": int(version.version), "alias": r.alias, "protocol_id": metrics["protocol_id"],
        "fid": metrics["fid"], "recall": metrics["recall"], "class_accuracy": metrics["class_accuracy"],
        "threshold": gate.fid_threshold, "recall_floor": gate.recall_floor, "class_accuracy_floor": gate.class_accuracy_floor,
        "run_id": run_id, **asdict(decision),
    }  # fmt: skip
    atomic_write_json(f"{r.out_dir}/{family}.json", record)
    if require_promotion and not decision.promoted:
        return {**record, "exit_code": 1}
    return record


def model_card(family: str, metrics: dict, gen_meta: dict, gate: GateConfig, decision: GateDecision, run_id: str) -> str:
    """The registered version's description (Markdown in MLflow's UI): what it is, its metrics beside the
    protocol's real-vs-real floor, the gate's thresholds and decision, and where it came from."""
    floor = metrics.get("floor", {})
    rows = [f"| {key} | {metrics[key]:.4g} | {floor[key]:.4g} |" if key in floor else f"| {key} | {metrics[key]:.4g} | |"
            for key in ("fid", "kid", "precision", "recall", "class_accuracy", "fid_classifier", "diversity", *PAIRED_KEYS) if key in metrics]  # fmt: skip
    sampler = f", sampler {metrics['sampler']} x {metrics['sampler_steps']}" if "sampler" in metrics else ""
    return "\n".join([
        f"**genforge {family}** generator at step {gen_meta['step']}{sampler}. Training run `{run_id}`: its sample grids are "
        "the run's `samples` images (step slider on the run page).",
        "",
        f"Measured under protocol `{metrics['protocol_id']}` (the floor: real images against the same reference).",
        "",
        "| metric | this model | real-vs-real floor |", "|---|---|---|", *rows,
        "",
        f"**Gate at registration: {'promoted' if decision.promoted else 'rejected'}** ({decision.reason}). Thresholds: fid <= "
        f"{gate.fid_threshold}, recall >= {gate.recall_floor}, class_accuracy >= {gate.class_accuracy_floor}.",
        "",
        f"Data `{gen_meta['data_hash']}`, code `{gen_meta['git_revision']}`.",
    ])  # fmt: skip


def promote(cfg: RunConfig, family: str, version: str, override: str | None = None) -> dict:
    """A person's promotion of `version` (`genforge promote`). Without `override`: an override pin on the
    champion ends and the gate runs for `version` exactly as `register` runs it (the alias ends on the best
    passing version, which may be another). With `override` (the reason, required): `version` becomes
    champion whatever the gate says, recorded on it (gate=override, reason, who, when) and pinned.
    -> the decision record (also what the gate criteria say of the version)."""
    from mlflow.exceptions import MlflowException

    gate, alias = getattr(cfg.registry, family), cfg.registry.alias
    mlflow = connect(cfg)
    with server_calls(tracking_uri(cfg), f"promoting {gate.model_name} v{version}"):
        client = mlflow.MlflowClient()
        try:
            record = gate_record(client.get_model_version(gate.model_name, version))
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise StageError(f"{gate.model_name} v{version}: no such version") from None
        measured = math.isfinite(record["fid"]) and record["protocol_id"] is not None
        held, failed = criteria(record, gate) if measured else ([], ["no gate metrics (not registered by the register stage)"])
        if override is not None:
            decision = _override(client, gate.model_name, alias, record["version"], override)
        elif not measured:
            raise StageError(f"{gate.model_name} v{version}: {failed[0]}; only --override REASON promotes it")
        else:
            _unpin(client, gate.model_name, alias)
            decision = _apply_gate(client, gate, alias, record["version"], record)
    return {"model_name": gate.model_name, "version": int(version), "alias": alias, "criteria_held": held, "criteria_failed": failed,
            "override": override, **asdict(decision)}  # fmt: skip


def _override(client, name: str, alias: str, version: str, reason: str) -> GateDecision:
    """Crown `version` past the gate: recorded on the version first, so a registration that reads the
    alias already sees the pin."""
    import datetime
    import getpass

    if not reason.strip():
        raise StageError("--override needs a reason (it is recorded on the version)")
    by, at = getpass.getuser(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for key, value in (("gate", OVERRIDE), (OVERRIDE_REASON, reason.strip()), (OVERRIDE_BY, by), (OVERRIDE_AT, at)):
        _write(client.set_model_version_tag, name, version, key, value)
    _write(client.set_registered_model_alias, name, alias, version)
    return GateDecision(True, f"by override of {by} at {at}: {reason.strip()}")


def _unpin(client, name: str, alias: str) -> None:
    """End an override pin on the current champion (its reason, who and when stay as a record)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return
    if champion.tags.get("gate") == OVERRIDE:
        _write(client.set_model_version_tag, name, champion.version, "gate", "override ended")


def _write(call, *args, missing_ok: bool = False) -> None:
    """One registry write (a tag, an alias) that another process may make at the same moment. MLflow's SQL
    store writes by reading, then inserting or updating: of two first writes at once, one fails on the unique
    key (sqlite: "UNIQUE constraint failed", an error response, not a lost connection), and the same write
    made again updates. `missing_ok`: for a delete, finding nothing (the other process deleted it first) is done."""
    from mlflow.exceptions import RestException

    for attempt in range(3):
        try:
            call(*args)
            return
        except RestException as err:
            if missing_ok and err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return
            if attempt == 2:
                raise


def _ensure_registered_model(client, name: str, family: str) -> None:
    """Create the registered model unless it exists; a concurrent creator winning the race is fine."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        what = {"pix2pix": "image-to-image translator", "t2i": "text-to-image generator"}.get(family, "class-conditional generator")
        client.create_registered_model(name, description=f"genforge {what} ({family})")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _all_versions(client, name: str) -> list:
    """Every version of `name`, all pages."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _version_of(client, name: str, generator_sha256: str):
    """The version that holds this generator: the lowest-numbered one tagged with its sha256, or None."""
    same = [v for v in _all_versions(client, name) if v.tags.get("generator_sha256") == generator_sha256]
    return min(same, key=lambda v: int(v.version)) if same else None


def _evaluation(cfg: RunConfig, family: str, gen_meta: dict) -> dict:
    """The evaluate stage's record of this very model (same step and family), or one line."""
    eval_file = cfg.eval_file(family)
    try:
        metrics = json.loads(Path(eval_file).read_text())
    except FileNotFoundError:
        raise StageError(f"{eval_file}: not found (run the evaluate stage first)") from None
    if metrics.get("step") != gen_meta["step"] or metrics.get("family", "gan") != gen_meta.get("family", "gan"):
        raise StageError(f"{eval_file}: evaluates another model (step {metrics.get('step')}); rerun evaluate --family {family}")
    return metrics


PARAM_TYPES = {str: "string", int: "long", float: "double"}


def _log_version(mlflow, client, model_name: str, generator_dir: Path, run_id: str, tags: dict[str, str]):
    """Log the generator as an MLflow "model from code" linked to its training run (without reopening
    that run: its status stays what training left) and register it with `tags` (its sha256, metrics and
    training run id) written in the same registry write that creates it.
    Another process registering the same generator at the same time may have made a version too: the
    lowest-numbered one is kept and the others deleted by their makers, so both end on the same version."""
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    from gen_core.image_requests import DEFAULTS, TRANSLATION_DEFAULTS

    family = read_generator_meta(generator_dir).get("family", "gan")
    settings = TRANSLATION_DEFAULTS if family == "pix2pix" else DEFAULTS
    if family == "pix2pix":  # two blank inputs at the model's resolution, as base64 PNGs
        blank = example_png(read_generator_meta(generator_dir)["resolution"])
        example = (pd.DataFrame({"image": [blank, blank]}), {"format": "png"})
    elif family == "t2i":
        example = (pd.DataFrame({"prompt": ["a dark sneaker", "a light dress, filling the frame"], "seed": [0, 1]}), {"format": "png"})
    else:
        example = (pd.DataFrame({"label": [0, 1], "seed": [0, 1]}), {"format": "png"})
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "generator"
        for path in weight_files(generator_dir):  # weights and configs; not the sample grid
            (artifact / path.relative_to(generator_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, artifact / path.relative_to(generator_dir))
        info = Model.log(
            artifact_path=None, name="generator", flavor=mlflow.pyfunc, run_id=run_id, python_model=str(MODEL_CODE),
            artifacts={"generator": str(artifact)}, code_paths=[str(REPO_ROOT / "gen_core")], pip_requirements=PIP_REQUIREMENTS,
            # no input schema: `label` takes class ids and names alike (the model checks every row itself); the settings as params
            signature=ModelSignature(inputs=None, params=ParamSchema([ParamSpec(k, PARAM_TYPES[type(v)], v) for k, v in settings.items()])),
            input_example=example,
        )  # fmt: skip
    made = mlflow.register_model(info.model_uri, model_name, tags=tags)
    kept = _version_of(client, model_name, tags["generator_sha256"])
    if kept is not None and kept.version != made.version:
        client.delete_model_version(model_name, made.version)
        print(f"{model_name} v{kept.version} holds this generator already (registered concurrently): v{made.version} deleted", flush=True)
        return kept
    return client.get_model_version(model_name, made.version)  # the source is a models:/m-... URI; tags link the training run


def example_png(resolution: int) -> str:
    """A blank grey image as a base64 PNG: the input example of an image-to-image model."""
    import base64

    import numpy as np

    from gen_core.sampling import png_bytes

    return base64.b64encode(png_bytes(np.zeros((resolution, resolution, 1), np.uint8))).decode("ascii")


def _version_tags(metrics: dict, gen_meta: dict, run_id: str, generator_sha256: str, family: str, gate: GateConfig) -> dict[str, str]:
    floor = metrics.get("floor", {})
    return {
        # full precision where the gate reads them back (pipelines.registry.converge)
        **{k: repr(float(metrics[k])) for k in ("fid", "recall", "class_accuracy")},
        **{k: f"{metrics[k]:.6f}" for k in ("kid", "fid_classifier", "precision", "classifier_score", "diversity")},
        "classes_covered": str(metrics["classes_covered"]), "protocol": metrics["protocol"], "protocol_id": metrics["protocol_id"],
        **{f"floor_{k}": f"{v:.6f}" for k, v in floor.items() if k in ("fid", "precision", "recall", "class_accuracy")},
        "gate_fid_threshold": str(gate.fid_threshold), "gate_recall_floor": str(gate.recall_floor),
        "gate_class_accuracy_floor": str(gate.class_accuracy_floor), "data_hash": gen_meta["data_hash"],
        "fid_feature_sha256": metrics["feature_sha256"], "git_revision": gen_meta["git_revision"], "step": str(gen_meta["step"]),
        "training_run_id": run_id, "generator_sha256": generator_sha256, "model_family": family,
        **{k: str(metrics[k]) for k in ("sampler", "sampler_steps", "guidance_scale", "guidance_interval", "guidance", "guide_blend") if k in metrics},
        **{k: f"{metrics[k]:.6f}" for k in PAIRED_KEYS if k in metrics},  # the paired families' own measures
    }  # fmt: skip


def gate_record(version) -> dict:
    """What the gate reads of a registered version: its number, the gate's metrics (inf/0 when untagged:
    a version whose tags were never written cannot win), its protocol, and whether it was revoked."""
    tags = version.tags

    def number(key: str, missing: float) -> float:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return missing

    return {
        "version": str(version.version), "fid": number("fid", math.inf), "recall": number("recall", 0.0),
        "class_accuracy": number("class_accuracy", 0.0), "protocol_id": tags.get("protocol_id"), "revoked": "revoked" in tags,
        "pinned": tags.get(OVERRIDE_REASON, "") if tags.get("gate") == OVERRIDE else None,
    }  # fmt: skip


def converge(versions: list[dict], champion: str | None, gate: GateConfig, protocol_id: str) -> str | None:
    """Pure: which version should hold the alias, given every version's gate record and the current
    champion's number. Candidates are the versions measured under `protocol_id`, not revoked, that pass
    every criterion of `gate`. The champion stays if it is a candidate with the lowest FID (ties never
    displace it); otherwise the candidate with the lowest FID, then the lowest number, takes the alias;
    with no candidate the alias stays where it is. A champion promoted by override is pinned: it stays.
    The answer depends on the registry's contents only, not on who asks or when, which is what makes
    concurrent registrations end on the same champion."""
    if any(v["version"] == champion and v.get("pinned") is not None for v in versions):
        return champion
    candidates = [v for v in versions if v["protocol_id"] == protocol_id and not v["revoked"] and not criteria(v, gate)[1]]
    if not candidates:
        return champion
    best = min(v["fid"] for v in candidates)
    if any(v["version"] == champion and v["fid"] == best for v in candidates):
        return champion
    return min((v for v in candidates if v["fid"] == best), key=lambda v: int(v["version"]))["version"]


def _apply_gate(client, gate: GateConfig, alias: str, mine: str, metrics: dict) -> GateDecision:
    """Move the alias to the version `converge` names, re-reading the registry after every move until a
    read confirms it (MLflow has no compare-and-set: a process that acted on a stale read sees its move
    was wrong on the next read and corrects it; the last process to move reads last). Then tag `mine`
    with its outcome."""
    first_champion = None
    for attempt in range(20):
        versions = [gate_record(v) for v in _all_versions(client, gate.model_name)]
        champion = client.get_registered_model(gate.model_name).aliases.get(alias)
        champion = str(champion) if champion is not None else None
        if attempt == 0:
            first_champion = champion
        records = {v["version"]: v for v in versions}
        if champion is not None and champion in records and champion != mine and records[champion]["pinned"] is None:
            decide(metrics, gate, records[champion])  # raises if the champion was measured under another protocol
        target = converge(versions, champion, gate, metrics["protocol_id"])
        if target == champion:
            break
        _write(client.set_registered_model_alias, gate.model_name, alias, target)
    else:
        raise StageError(f"gate: {gate.model_name}@{alias} did not settle after 20 moves (other processes keep moving it)")

    return _verdict(client, gate, alias, mine, metrics, champion, first_champion, records)


def _verdict(client, gate: GateConfig, alias: str, mine: str, metrics: dict, champion: str | None, first_champion: str | None,
             records: dict[str, dict]) -> GateDecision:  # fmt: skip
    """`mine`'s outcome once the alias has settled on `champion`, tagged on `mine` (gate, rejected)."""
    pinned = records[champion]["pinned"] if champion in records else None
    if champion == mine and pinned is not None:
        return GateDecision(True, f"already champion, by override ({pinned})")
    failed = criteria(metrics, gate)[1]
    tags = client.get_model_version(gate.model_name, mine).tags
    if champion == mine and not failed:
        if first_champion == mine:
            decision = GateDecision(True, "already champion")
        else:  # the champion this process found first, which `mine` displaced (or none)
            decision = GateDecision(True, decide(metrics, gate, records.get(first_champion) if first_champion is not None else None).reason)
        _write(client.set_model_version_tag, gate.model_name, mine, "gate", "promoted")
        if "rejected" in tags:
            _write(client.delete_model_version_tag, gate.model_name, mine, "rejected", missing_ok=True)
        return decision
    if champion == mine:  # a champion that fails today's gate keeps the alias only while no version passes it
        decision = GateDecision(False, f"keeps @{alias} only because no version passes the gate: {', '.join(failed)}")
    elif pinned is not None:
        decision = GateDecision(False, f"v{champion} holds @{alias} by override ({pinned}); genforge promote moves it")
    else:
        decision = decide(metrics, gate, records.get(champion) if champion is not None else None)
        if decision.promoted:  # passes everything, yet another version holds the alias: `mine` was revoked
            decision = GateDecision(False, f"revoked ({tags.get('revoked')}); v{champion} holds @{alias}")
    _write(client.set_model_version_tag, gate.model_name, mine, "gate", "rejected")
    _write(client.set_model_version_tag, gate.model_name, mine, "rejected", decision.reason)
    return decision
