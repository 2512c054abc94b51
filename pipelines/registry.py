"""The model registry: an MLflow model version per exported generator and the gate on the `champion` alias.

Each family has its own registered model (registry.<family>.model_name). The alias moves only if
FID <= registry.<family>.fid_threshold, recall >= recall_floor, class accuracy >= class_accuracy_floor
and FID is better than the current champion's, measured under the same evaluation protocol (a champion
measured under another is not compared: one line, exit 2); otherwise the version is tagged `rejected`
with every failed criterion. Registering the same generator again reuses its version
(idempotent). Used by the register stage and by the sweep for its best trial.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from gen_core.config import GateConfig, RunConfig
from gen_core.generators import generator_digest, load_image_generator, read_generator_meta, weight_files
from gen_core.io import atomic_write_json
from pipelines.common import REPO_ROOT, StageError
from pipelines.tracking import connect, training_run

MODEL_CODE = REPO_ROOT / "pipelines" / "mlflow_model.py"
# explicit: inferring them takes ~8 s
PIP_REQUIREMENTS = ["torch==2.14.1", "diffusers==0.42.1", "safetensors", "numpy", "fsspec", "pandas", "pydantic>=2.6", "pyyaml"]


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str


def decide(metrics: dict, gate: GateConfig, champion: dict | None) -> GateDecision:
    """Pure gate: promote iff FID is finite and at or below the threshold, recall and class accuracy are at
    or above their floors, and FID is strictly better than the champion's. The reason names every
    criterion that failed (or, on promotion, every one that held). `champion` (its fid and protocol_id)
    must have been measured under the candidate's protocol: comparing across protocols is refused."""
    if champion is not None and champion.get("protocol_id") != metrics["protocol_id"]:
        raise StageError(
            f"gate: champion v{champion['version']} was measured under protocol {champion.get('protocol_id') or '(none recorded)'}, "
            f"this model under {metrics['protocol_id']}: not comparable; set evaluate.protocol to the champion's, or re-evaluate the champion"
        )
    fid = metrics["fid"]
    held, failed = [], []

    def check(ok: bool, text: str) -> None:
        (held if ok else failed).append(text)

    if not math.isfinite(fid):
        check(False, f"fid {fid} is not finite")
    else:
        check(fid <= gate.fid_threshold, f"fid {fid:.2f} {'<=' if fid <= gate.fid_threshold else '>'} threshold {gate.fid_threshold:.2f}")
    for key, floor in (("recall", gate.recall_floor), ("class_accuracy", gate.class_accuracy_floor)):
        value = metrics[key]
        check(value >= floor, f"{key} {value:.3f} {'>=' if value >= floor else '<'} floor {floor:.3f}")
    if champion is None:
        held.append("no previous champion")
    elif math.isfinite(fid) and fid < champion["fid"]:
        held.append(f"better than champion's {champion['fid']:.2f}")
    else:
        failed.append(f"fid {fid:.2f} is not better than champion's {champion['fid']:.2f}")
    return GateDecision(not failed, ", ".join(failed or held))


def load_registered_generator(model_uri: str):
    """Build a generator (GAN or diffusion) from a registered version, e.g. models:/genforge-ldm@champion,
    using only its safetensors weights and JSON configs: no code from the registry is executed."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/artifacts/generator", dst_path=tmp)
        generator, _ = load_image_generator(local)
    return generator


def _find_version(client, name: str, run_id: str, generator_sha256: str):
    for version in client.search_model_versions(f"name='{name}'"):
        if version.run_id == run_id and version.tags.get("generator_sha256") == generator_sha256:
            return version
    return None


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
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    run_id = training_run(mlflow, gen_meta.get("mlflow_run_id"), generator_dir)
    try:
        client.get_registered_model(gate.model_name)
    except MlflowException:
        client.create_registered_model(gate.model_name, description=f"genforge class-conditional generator ({family})")
    version = _find_version(client, gate.model_name, run_id, generator_sha256)
    if version is None:
        version = _log_version(mlflow, client, gate.model_name, generator_dir, run_id, generator_sha256)
    for key, value in _version_tags(metrics, gen_meta, run_id, generator_sha256, family, gate).items():
        client.set_model_version_tag(gate.model_name, version.version, key, value)
    decision = _apply_gate(client, gate, r.alias, version, metrics)

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


def _log_version(mlflow, client, model_name: str, generator_dir: Path, run_id: str, generator_sha256: str):
    """Log the generator as an MLflow "model from code" under its training run and register it."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        artifact = Path(tmp) / "generator"
        for path in weight_files(generator_dir):  # weights and configs; not the sample grid
            (artifact / path.relative_to(generator_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, artifact / path.relative_to(generator_dir))
        info = mlflow.pyfunc.log_model(
            name="generator", python_model=str(MODEL_CODE), artifacts={"generator": str(artifact)},
            code_paths=[str(REPO_ROOT / "gen_core")], pip_requirements=PIP_REQUIREMENTS,
            input_example=pd.DataFrame({"label": [0, 1], "seed": [0, 1]}),
        )  # fmt: skip
    version = mlflow.register_model(info.model_uri, model_name, tags={"generator_sha256": generator_sha256})
    version = client.get_model_version(model_name, version.version)
    # log_model's source is a models:/m-... URI; the run id links the version to its training run
    if version.run_id != run_id:
        client.set_model_version_tag(model_name, version.version, "training_run_id", run_id)
    return version


def _version_tags(metrics: dict, gen_meta: dict, run_id: str, generator_sha256: str, family: str, gate: GateConfig) -> dict[str, str]:
    floor = metrics.get("floor", {})
    return {
        "fid": repr(float(metrics["fid"])),  # full precision: the gate compares against it
        **{k: f"{metrics[k]:.6f}" for k in ("kid", "fid_classifier", "class_accuracy", "precision", "recall", "classifier_score", "diversity")},
        "classes_covered": str(metrics["classes_covered"]), "protocol": metrics["protocol"], "protocol_id": metrics["protocol_id"],
        **{f"floor_{k}": f"{v:.6f}" for k, v in floor.items() if k in ("fid", "precision", "recall", "class_accuracy")},
        "gate_fid_threshold": str(gate.fid_threshold), "gate_recall_floor": str(gate.recall_floor),
        "gate_class_accuracy_floor": str(gate.class_accuracy_floor), "data_hash": gen_meta["data_hash"],
        "fid_feature_sha256": metrics["feature_sha256"], "git_revision": gen_meta["git_revision"], "step": str(gen_meta["step"]),
        "training_run_id": run_id, "generator_sha256": generator_sha256, "model_family": family,
        **{k: str(metrics[k]) for k in ("sampler", "sampler_steps", "guidance_scale") if k in metrics},
    }  # fmt: skip


def _champion_record(champion) -> dict | None:
    if champion is None:
        return None
    fid = float(champion.tags["fid"]) if "fid" in champion.tags else math.inf
    return {"version": champion.version, "fid": fid, "protocol_id": champion.tags.get("protocol_id")}


def _apply_gate(client, gate: GateConfig, alias: str, version, metrics: dict) -> GateDecision:
    """Move the alias to `version` if the gate says so; tag the version with the outcome."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(gate.model_name, alias)
    except MlflowException:
        champion = None
    if champion is not None and champion.version == version.version:
        return GateDecision(True, "already champion")
    decision = decide(metrics, gate, _champion_record(champion))
    if decision.promoted:
        client.set_registered_model_alias(gate.model_name, alias, version.version)
        client.set_model_version_tag(gate.model_name, version.version, "gate", "promoted")
        if "rejected" in version.tags:
            client.delete_model_version_tag(gate.model_name, version.version, "rejected")
    else:
        client.set_model_version_tag(gate.model_name, version.version, "gate", "rejected")
        client.set_model_version_tag(gate.model_name, version.version, "rejected", decision.reason)
    return decision
