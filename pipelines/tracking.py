"""MLflow plumbing: where the tracking store is, and failing fast when it cannot be reached."""

from __future__ import annotations

import base64
import contextlib
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from gen_core.config import RunConfig
from pipelines.common import StageError, state_path


def tracking_uri(cfg: RunConfig) -> str:
    """params > MLFLOW_TRACKING_URI > sqlite store in the project. Relative sqlite paths resolve against the project's
    state root (common.state_root: outside an experiment's temporary workspace) and become absolute, so Ray workers
    (which run in other directories) reach the same store."""
    return absolute_sqlite(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db", state_path)


def absolute_sqlite(uri: str, resolve: Callable[[str], str]) -> str:
    """A relative sqlite store (sqlite:///mlflow.db) with its path through `resolve`; any other URI as it is."""
    prefix = "sqlite:///"
    return prefix + resolve(uri[len(prefix) :]) if uri.startswith(prefix) and not uri.startswith(prefix + "/") else uri


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


def _health_request(uri: str) -> urllib.request.Request:
    """GET <server>/health, with the URI's credentials (if any) as basic auth, as MLflow's client sends them;
    the host the resolver sees is the URI's hostname, never `user:password@host`."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]"
    netloc += f":{parts.port}" if parts.port else ""
    request = urllib.request.Request(urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")))
    username, password = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")) if parts.username is not None else (
        os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))  # fmt: skip
    if username is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode())
    return request


def adopt_credentials(uri: str) -> str:
    """A URI's userinfo (https://user:token@host) moves into MLFLOW_TRACKING_USERNAME/PASSWORD, which
    MLflow's client sends as basic auth, and the URI without it is returned: MLflow prints and stores
    the tracking URI it is given (e.g. "View run ... at: <uri>/#/..."), so it must never hold a secret."""
    if not uri.startswith(("http://", "https://")):
        return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password or "")
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def check_reachable(uri: str, wait_s: float = 5.0) -> None:
    """An http(s) tracking server must answer /health within `wait_s` (retried every second or so),
    else one line naming the server (credentials redacted)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        request = _health_request(uri)
    except ValueError as err:  # e.g. a non-numeric port
        raise StageError(f"MLflow tracking URI {redact(uri)}: malformed ({err})") from None
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            with urllib.request.urlopen(request, timeout=min(5.0, wait_s)) as response:
                response.read()
            return
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            reason = getattr(reason, "strerror", None) or reason
            if time.monotonic() + 1.0 >= deadline:
                raise StageError(f"MLflow tracking server {redact(uri)}: unreachable for {wait_s:g} s ({reason})") from None
            if not said:
                print(f"MLflow tracking server {redact(uri)} does not answer ({reason}); retrying for up to {wait_s:g} s", flush=True)
                said = True
            time.sleep(1.0)


def bound_retries(wait_s: float) -> None:
    """MLflow's client retries a failed request with exponential backoff: 7 retries, factor 2, ~4 minutes.
    Fit the retries into `wait_s` (factor 1 s: 1+2+4+... s plus up to 1 s jitter each), unless the
    MLFLOW_HTTP_REQUEST_* variables were set by the user. Env vars: Ray workers inherit them."""
    retries = 0
    while (2 ** (retries + 1) - 1) + (retries + 1) <= wait_s and retries < 10:
        retries += 1
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(10, int(wait_s // 2))))


def artifact_location(cfg: RunConfig, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: tracking.artifact_location, else next to a sqlite
    store (<its directory>/mlartifacts), else (a server) the server's own default."""
    if cfg.tracking.artifact_location:
        location = cfg.tracking.artifact_location
        return location if "://" in location else Path(location).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def connect(cfg: RunConfig):
    """Point mlflow at the configured store, check it answers, select the experiment. Returns the module."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    bound_retries(cfg.tracking.server_wait_s)
    import mlflow

    uri = adopt_credentials(tracking_uri(cfg))
    check_reachable(uri, cfg.tracking.server_wait_s)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with server_calls(uri, f"selecting experiment {cfg.tracking.experiment}"):
        if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
            try:
                mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg, uri))
            except mlflow.exceptions.MlflowException as err:  # another process creating it in between is fine
                if "already exists" not in str(err) and "RESOURCE_ALREADY_EXISTS" not in str(err):
                    raise
        mlflow.set_experiment(cfg.tracking.experiment)
    return mlflow


def unreachable(err: BaseException) -> bool:
    """Whether an exception from the MLflow client means the server could not be reached (after retries)."""
    import requests

    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    text = str(err)
    return "API request to" in text and ("Max retries exceeded" in text or "Connection" in text or "timed out" in text)


@contextlib.contextmanager
def server_calls(uri: str, doing: str):
    """Turn "the tracking server stopped answering" (after MLflow's bounded retries) into one line."""
    try:
        yield
    except Exception as err:
        if uri.startswith(("http://", "https://")) and unreachable(err):
            raise StageError(f"MLflow tracking server {redact(uri)}: stopped answering while {doing}") from err
        raise


class RunLog:
    """Logging to a finished MLflow run without reopening it (mlflow.start_run(run_id) would set it
    RUNNING, and FAILED if what follows fails): a later step's failure never rewrites the run's status."""

    def __init__(self, run_id: str):
        import mlflow

        self.run_id, self.client = run_id, mlflow.MlflowClient()

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])


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
