"""The model registry: an MLflow model version per exported generator and the gate on the `champion` alias.

Each family has its own registered model (registry.<family>.model_name). The alias moves only if
FID <= registry.<family>.fid_threshold and FID is better than the current champion's; otherwise the
version is tagged `rejected` with the reason. Registering the same generator again reuses its version
(idempotent). Used by the register stage and by the sweep for its best trial.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from gen_core.config import RunConfig
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


def decide(fid: float, threshold: float, champion_fid: float | None) -> GateDecision:
    """Pure gate: promote iff fid <= threshold and (no champion or strictly better than it)."""
    if not math.isfinite(fid):
        return GateDecision(False, f"fid {fid} is not finite")
    if fid > threshold:
        return GateDecision(False, f"fid {fid:.2f} > threshold {threshold:.2f}")
    if champion_fid is not None and fid >= champion_fid:
        return GateDecision(False, f"fid {fid:.2f} is not better than champion's {champion_fid:.2f}")
    versus = f", better than champion's {champion_fid:.2f}" if champion_fid is not None else ", no previous champion"
    return GateDecision(True, f"fid {fid:.2f} <= threshold {threshold:.2f}{versus}")


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
    for key, value in _version_tags(metrics, gen_meta, run_id, generator_sha256, family).items():
        client.set_model_version_tag(gate.model_name, version.version, key, value)
    decision = _apply_gate(client, gate, r.alias, version, metrics["fid"])

    verdict = "PROMOTED" if decision.promoted else "REJECTED"
    line = f"gate: {verdict} {gate.model_name} v{version.version} -> @{r.alias}: {decision.reason}" if decision.promoted else (
        f"gate: {verdict} {gate.model_name} v{version.version}: {decision.reason}"
    )
    print(line, flush=True)
    record = {
        "model_name": gate.model_name, "version": int(version.version), "alias": r.alias, "fid": metrics["fid"],
        "threshold": gate.fid_threshold, "run_id": run_id, **asdict(decision),
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


def _version_tags(metrics: dict, gen_meta: dict, run_id: str, generator_sha256: str, family: str) -> dict[str, str]:
    return {
        "fid": repr(float(metrics["fid"])),  # full precision: the gate compares against it
        "kid": f"{metrics['kid']:.6f}", "fid_classifier": f"{metrics['fid_classifier']:.6f}",
        "class_accuracy": f"{metrics['class_accuracy']:.6f}", "data_hash": gen_meta["data_hash"],
        "fid_feature_sha256": metrics["feature_sha256"], "git_revision": gen_meta["git_revision"], "step": str(gen_meta["step"]),
        "training_run_id": run_id, "generator_sha256": generator_sha256, "model_family": family,
        **{k: str(metrics[k]) for k in ("sampler", "sampler_steps", "guidance_scale") if k in metrics},
    }  # fmt: skip


def _apply_gate(client, gate, alias: str, version, fid: float) -> GateDecision:
    """Move the alias to `version` if the gate says so; tag the version with the outcome."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(gate.model_name, alias)
    except MlflowException:
        champion = None
    if champion is not None and champion.version == version.version:
        return GateDecision(True, "already champion")
    champion_fid = float(champion.tags["fid"]) if champion is not None and "fid" in champion.tags else None
    decision = decide(fid, gate.fid_threshold, champion_fid)
    if decision.promoted:
        client.set_registered_model_alias(gate.model_name, alias, version.version)
        client.set_model_version_tag(gate.model_name, version.version, "gate", "promoted")
        if "rejected" in version.tags:
            client.delete_model_version_tag(gate.model_name, version.version, "rejected")
    else:
        client.set_model_version_tag(gate.model_name, version.version, "gate", "rejected")
        client.set_model_version_tag(gate.model_name, version.version, "rejected", decision.reason)
    return decision
