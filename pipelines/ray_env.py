"""Connecting to Ray and to checkpoint storage."""

from __future__ import annotations

import os

from gen_core.config import RunConfig
from gen_core.io import filesystem
from pipelines.common import REPO_ROOT, StageError, absolute


def init_ray(cfg: RunConfig):
    """Join the cluster at ray.address / RAY_ADDRESS, or start a local Ray sized for the job."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # per-worker progress lines differ on purpose
    try:
        if address:
            # Join as is: under `ray job submit` the job's own runtime env (working_dir) applies.
            ray.init(address=address)
        else:
            needed = cfg.ray.num_workers * cfg.ray.cpus_per_worker
            # The dashboard (127.0.0.1 only) backs the State API that Train V2's placement-group
            # cleaner polls; without it every run logs a warning per second.
            ray.init(
                num_cpus=max(os.cpu_count() or 1, needed),
                runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}},
            )  # fmt: skip
    except ConnectionError as err:
        raise StageError(f"Ray cluster at {address}: unreachable ({err})") from None
    return ray


def storage(cfg: RunConfig, path: str | None = None) -> tuple[str, object | None]:
    """(storage_path, pyarrow filesystem or None) for Ray's RunConfig, of ray.storage_path unless `path`
    is given. s3:// goes through s3fs so a custom endpoint (AWS_ENDPOINT_URL: MinIO, moto) works the same as for data."""
    path = path or cfg.ray.storage_path
    if not path.startswith("s3://"):
        return absolute(path), None
    import pyarrow.fs

    fs, bucket_path = filesystem(path)  # same s3fs settings as the data readers
    return bucket_path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_uri(cfg: RunConfig, run_dir: str) -> str:
    """fsspec URI of a run's directory in checkpoint storage."""
    path = cfg.ray.storage_path if "://" in cfg.ray.storage_path else absolute(cfg.ray.storage_path)
    return f"{path.rstrip('/')}/{run_dir}"
