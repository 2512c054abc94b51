"""MLflow plumbing: where the tracking store is, and failing fast when it cannot be reached."""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.parse
import urllib.request

from gen_core.config import RunConfig
from pipelines.common import REPO_ROOT, StageError


def tracking_uri(cfg: RunConfig) -> str:
    """params > MLFLOW_TRACKING_URI > sqlite store in the repo. Relative sqlite paths become absolute
    so Ray workers and `ray job submit` drivers (which run in other directories) reach the same store."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str((REPO_ROOT / uri[len("sqlite:///") :]).resolve())
    return uri


def redact(uri: str | None) -> str | None:
    """`uri` without the credentials of its userinfo part (https://user:token@host -> https://***@host).
    Anything that is written, logged or uploaded gets this form, never the real one."""
    if not uri or "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def persisted_config(cfg: RunConfig) -> dict:
    """The config as it may be written next to a checkpoint, an export or an MLflow run: no credentials."""
    dumped = cfg.model_dump(mode="json")
    dumped["tracking"]["tracking_uri"] = redact(dumped["tracking"]["tracking_uri"])
    return dumped


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/") + "/health")
    if parts.username is not None:  # MLflow's client sends URL credentials as basic auth; so does this check
        token = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}".encode())
        request.add_header("Authorization", "Basic " + token.decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StageError(f"MLflow tracking server {redact(uri)}: unreachable ({getattr(reason, 'strerror', None) or reason})") from None


def connect(cfg: RunConfig):
    """Point mlflow at the configured store, check it answers, select the experiment. Returns the module."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri(cfg)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:"):
        # sqlite stores keep artifacts next to the repo, not in the caller's cwd
        if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=(REPO_ROOT / "mlartifacts").as_uri())
    mlflow.set_experiment(cfg.tracking.experiment)
    return mlflow


def training_run(mlflow, run_id: str | None, model_dir: str) -> str:
    """The MLflow run that trained the model in `model_dir` (its generator.json's mlflow_run_id), checked
    to exist in the store now configured: a model trained against another store is one line, not a
    traceback after the work is done."""
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    if not run_id:
        raise StageError(f"{model_dir}: its generator.json names no MLflow run; retrain it with tracking on")
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise StageError(
            f"{model_dir}: trained under MLflow run {run_id}, which tracking store {uri} does not hold; "
            "set tracking.tracking_uri to the store it was trained with"
        ) from None
    return run_id
