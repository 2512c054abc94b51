"""Connecting to Ray and to checkpoint storage."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from gen_core.config import RunConfig
from gen_core.io import filesystem
from pipelines.common import REPO_ROOT, StageError, debugging, state_path


def ray_defaults() -> None:
    """Environment defaults for a Ray this process starts (its raylets and workers inherit them)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # per-worker progress lines differ on purpose
    # Offline and private by default: no usage-stats reports, no cloud-metadata probes (RAY_USAGE_STATS_ENABLED=1 opts in).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def ray_address(cfg: RunConfig) -> str | None:
    """The cluster to join: ray.address, else RAY_ADDRESS; None means a Ray of this process's own."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def answers_state_api(cfg: RunConfig, dashboard: bool | None = None) -> bool:
    """Whether the Ray that init_ray(cfg, dashboard) joins or starts answers Ray's State API: a cluster's own
    dashboard does; a Ray of this process's own has one only if started with its dashboard (default:
    ray.dashboard)."""
    return ray_address(cfg) is not None or (cfg.ray.dashboard if dashboard is None else dashboard)


def require_gpus(cfg: RunConfig, in_process: bool, ray_gpus: float | None = None) -> None:
    """ray.use_gpu on this machine's own Ray (no ray.address) or in this process, with fewer GPUs than the
    workers take (one each): refused in one line. Ray Train would wait for them forever: a local Ray never
    grows, its autoscaler only repeats "No available node types can fulfill resource request". Checked
    before Ray starts with torch's count (skipped once Ray is up here: a sweep's trials are placed by the
    sweep, which checks the cluster itself), and after init_ray with `ray_gpus`, what that Ray found (its
    detection can differ from torch's). A joined cluster may add GPU nodes on demand: never refused."""
    if not cfg.ray.use_gpu or ray_address(cfg) is not None:
        return
    if ray_gpus is None:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            return
        import torch

        found, where = torch.cuda.device_count(), "this machine has"
    else:
        found, where = ray_gpus, "the local Ray found"
    need = 1 if in_process else cfg.ray.num_workers
    if found < need:
        raise StageError(f"ray.use_gpu: {need} worker(s) need {need} GPU(s), {where} {found:g}; set ray.use_gpu: false, or join a GPU cluster with ray.address")


def in_process_allowed(cfg: RunConfig, workers: int) -> bool:
    """Whether `workers` training workers may run as the calling process's own loop instead of on Ray Train:
    one DDP worker (which needs no process group), unless ray.in_process is false. The rule a training stage
    (trains_in_process) and a sweep's trials (sweep.trains_in_process) share."""
    return cfg.ray.in_process and workers == 1 and cfg.ray.strategy == "ddp"


def trains_in_process(cfg: RunConfig) -> bool:
    """Whether a training stage runs its worker loop in its own process instead of on Ray Train: one DDP
    worker (in_process_allowed) on this machine, with nothing asked that only Ray Train gives: no cluster
    (ray.address, RAY_ADDRESS), no worker-group restarts (ray.max_failures) and no dashboard.
    For that one worker Ray Train would start a local Ray, its controller, five helper actors (each a process
    that imports ray.train, pandas included) and the worker: about 20 s and 30 CPU-s of start-up a stage on
    2 cores (benchmarks/RESULTS.md). The checkpoints are the same either way, so a run resumes across the
    two. ray.in_process: false keeps Ray Train."""
    ray = cfg.ray
    return in_process_allowed(cfg, ray.num_workers) and ray.max_failures == 0 and not ray.dashboard and ray_address(cfg) is None


def init_ray(cfg: RunConfig, dashboard: bool | None = None):
    """Join the cluster at ray.address / RAY_ADDRESS, or start a local Ray sized for the job, with its
    dashboard where `dashboard` (default: ray.dashboard)."""
    import ray

    if ray.is_initialized():
        return ray
    address = ray_address(cfg)
    ray_defaults()
    try:
        if address:
            # Join as is: under `ray job submit` the job's own runtime env (working_dir) applies.
            ray.init(address=address)
        else:
            num_cpus = max(os.cpu_count() or 1, cfg.ray.num_workers * cfg.ray.cpus_per_worker)
            start_local_ray(ray, num_cpus=num_cpus, dashboard=answers_state_api(cfg, dashboard))
    except ConnectionError as err:
        raise StageError(f"Ray cluster at {address}: unreachable ({err})") from None
    return ray


def start_local_ray(ray, num_cpus: int, dashboard: bool = True, attempts: int = 3) -> None:
    """A Ray of this process's own. address="local": without it Ray joins a cluster that `ray start` left
    running on this machine (and then refuses num_cpus). Its dashboard (127.0.0.1 only) backs the State API
    that Train V2's placement-group cleaner polls: a sweep needs it, or the placement groups of trials Tune
    stopped are never released and the sweep waits for CPUs forever. The cleaner finds it through
    RAY_API_SERVER_ADDRESS, set here for every worker, since without it it looks for "the" Ray on the machine
    and, beside another Ray, dies with `Found multiple active Ray instances`. Without the dashboard (a training
    stage's own Ray: everything it started ends with it) the cleaner's queries fail and it only warns
    (route_worker_logs drops those lines); the stage then starts ten fewer processes, 3.9 CPU-s and 2 s a run
    (benchmarks/RESULTS.md)."""
    for attempt in range(attempts):
        port = free_port()
        api_server = f"http://127.0.0.1:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = api_server  # this driver's own State API calls
        # PYTHONPATH: the repository first, then the driver's own (packages installed there, Ray's too, must import in the workers)
        python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env_vars = {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path, "RAY_API_SERVER_ADDRESS": api_server,
                    # Train's PreemptionWatcher (an actor process per run, ~1.3 CPU-s) watches for node drains; this one-node Ray has none
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")}  # fmt: skip
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=port,
                     runtime_env={"env_vars": env_vars})
            return
        except ValueError as err:  # the free port was taken before the dashboard bound it
            if "already occupied" not in str(err) or attempt == attempts - 1:
                raise


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def route_ray_logs(log_path: Path) -> None:
    """Start this run's section of `log_path` (appended to: a "--- date pid" line a run), before Ray starts.
    Ray's own driver-side log lines (its start-up notices, warnings) go there, not stderr, where they would
    come before the stage's one-line error; GENFORGE_DEBUG=1 keeps them on stderr too."""
    import importlib
    import logging

    importlib.import_module("ray")  # sets up the "ray" logger's stderr handler, which is replaced here

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
    logger = logging.getLogger("ray")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and not debugging():
            logger.removeHandler(handler)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(log_path) for h in logger.handlers):
        file_handler = logging.FileHandler(log_path)
        file_handler.setFormatter(logging.Formatter("(driver) %(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(file_handler)


# Train V2's placement-group cleaner, every second, where its Ray has no dashboard to answer (start_local_ray)
NO_STATE_API = "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable"


# The autoscaler's lines as Ray forwards them: each record of its logger starts with a timestamp; its periodic status
# report is the multi-line message of a record whose first line is empty ("autoscaler.py:408 -- ")
AUTOSCALER_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s")
AUTOSCALER_REPORT = re.compile(r"autoscaler\.py:\d+ --\s*$")


class AutoscalerNews:
    """Filters the autoscaler's forwarded lines (route_worker_logs): its status report, every 5 s whether
    anything changed or not (about 20 lines: nodes, usage, demands), and its "The autoscaler took N seconds"
    lines are dropped; its other records (nodes added or failed, warnings) are kept. A report can span
    several of Ray's batches, so the filter remembers whether it is inside one."""

    def __init__(self) -> None:
        self.in_report = False

    def __call__(self, lines: list[str]) -> list[str]:
        kept = []
        for line in lines:
            if AUTOSCALER_RECORD.match(line):
                self.in_report = bool(AUTOSCALER_REPORT.search(line))
                if self.in_report or "The autoscaler took " in line:
                    continue
            elif "======== Autoscaler status" in line:
                self.in_report = True
            if not self.in_report:
                kept.append(line)
        return kept


def route_worker_logs(log_path: Path, state_api: bool = True) -> None:
    """Ray forwards every worker's and actor's stdout and stderr to this driver. Keep it all in `log_path`
    (appended to the run's section that route_ray_logs started), and show on the console only stdout, which
    carries the progress lines: stderr holds Ray's warnings and, when a run fails, the worker and controller
    tracebacks, which would bury the stage's one-line error. GENFORGE_DEBUG=1 shows everything, as Ray does.
    Left out of the log: without a `state_api` (a Ray started without its dashboard) the placement-group
    cleaner's warnings that it cannot reach one (every second), and the autoscaler's periodic status report
    (about 20 lines every 5 s, the same on a fixed local Ray; its other lines, e.g. nodes added, are kept)."""
    import functools

    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    log_path.parent.mkdir(parents=True, exist_ok=True)
    sink = open(log_path, "a", buffering=1)
    show = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)
    autoscaler_news = AutoscalerNews()

    def handle(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or f"pid={data.get('pid')}"
        if not state_api and data["is_err"]:
            data = {**data, "lines": [line for line in data["lines"] if NO_STATE_API not in line]}
        if data.get("pid") == "autoscaler":
            data = {**data, "lines": autoscaler_news(data["lines"])}
        if not data["lines"]:
            return
        sink.writelines(f"({who}{' stderr' if data['is_err'] else ''}) {line}\n" for line in data["lines"])
        if debugging() or not data["is_err"]:
            show(data)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("genforge_logs")
    dispatcher.add_handler("genforge_logs", handle)


def storage(cfg: RunConfig, path: str | None = None) -> tuple[str, object | None]:
    """(storage_path, pyarrow filesystem or None) for Ray's RunConfig, of ray.storage_path unless `path`
    is given. s3:// goes through s3fs so a custom endpoint (AWS_ENDPOINT_URL: MinIO, moto) works the same as for data."""
    path = path or cfg.ray.storage_path
    if not path.startswith("s3://"):
        return state_path(path), None
    import pyarrow.fs

    fs, bucket_path = filesystem(path)  # same s3fs settings as the data readers
    return bucket_path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_uri(cfg: RunConfig, run_dir: str) -> str:
    """fsspec URI of a run's directory in checkpoint storage."""
    return f"{state_path(cfg.ray.storage_path).rstrip('/')}/{run_dir}"
