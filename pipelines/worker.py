"""What a training loop uses on each Ray Train worker, as small objects with one job each.

    worker, report, store = start_worker(worker_config)  # rank, device, strategy; MLflow reporting; checkpoints
    G = worker.strategy.wrap(...)
    start_step = store.restore([G, D])                   # newest readable checkpoint in storage, or 0
    evaluate = checkpoint_evaluator(worker, report, store)  # None unless the run evaluates during training
    for step in ...:
        ...                                              # the family's own step
        values = report.step_done(step + 1, losses)      # loss reduce + NaN check at log/checkpoint steps
        if store.due(step + 1):
            with store.writing(step + 1, [G, D], values) as checkpoint:
                ...                                      # gather EMA, sample grid, weights, evaluate
        if evaluate and evaluate.stop:                   # patience ran out
            break
    report.finished(...)

Every loop shows its log, evaluate and checkpoint steps in order; nothing runs through callbacks.
Only rank 0 prints and talks to MLflow. Collective calls are marked as such: every rank makes them.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from gen_core.checkpoint import CheckpointError, load_state, save_weights, write_meta
from gen_core.config import RunConfig, TrainingConfig
from gen_core.io import download_directory, filesystem, upload_directory
from gen_core.training import autocast_dtype, training_compute
from pipelines.common import format_duration
from pipelines.probe import Evaluation
from pipelines.strategy import Part, Strategy, build_strategy, check_resumable, prepare_compiler
from pipelines.tracking import adopt_credentials, persisted_config


@dataclass(frozen=True)
class RunContext:
    """Facts the driver resolves once and hands to every worker."""

    stage: str
    section: str  # the params section of what is trained (gan | autoencoder | ldm)
    data_uri: str
    num_classes: int
    signature: str
    run_uri: str  # this run's checkpoint directory (local path or s3://)
    data_hash: str
    git_revision: str
    tracking_uri: str  # as configured, credentials included (workers connect with it): never written anywhere
    mlflow_run_id: str
    extra: dict  # stage-specific inputs (e.g. the autoencoder directory), plain data
    deepspeed: dict | None = None  # ray.strategy deepspeed: the config file, completed for this run
    evaluation: dict | None = None  # in-training evaluation (pipelines.probe.ProbeSpec), e.g. for sweep trials
    # The loop runs in the calling process as the only worker, without Ray Train: a one-worker stage on this machine
    # (ray_env.trains_in_process), or a one-worker sweep trial in its Tune trial actor (sweep.trains_in_process). The
    # store then uploads and retires the checkpoints itself, and with tune_reports passes each checkpoint's metrics
    # to the trial (what Tune's TuneReportCallback does for a worker group).
    in_process: bool = False
    tune_reports: bool = False


# ---------------------------------------------------------------------------
# The worker: rank, device, strategy
# ---------------------------------------------------------------------------


class Worker:
    """This process in the Ray Train worker group (or, RunContext.in_process, the only worker)."""

    def __init__(self, cfg: RunConfig, ctx: RunContext):
        self.cfg, self.ctx = cfg, ctx
        spread = ""
        if ctx.in_process:  # the only worker: the stage's process, or a Tune trial's (where Ray refuses ray.train's context)
            self.rank, self.world_size = 0, 1
            self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.ray.use_gpu else torch.device("cpu")
        else:
            import ray
            import ray.train
            import ray.train.torch

            context = ray.train.get_context()
            self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
            self.device = ray.train.torch.get_device()
            nodes = set(self.all_gather(ray.get_runtime_context().get_node_id()))
            spread = f" across {len(nodes)} nodes" if len(nodes) > 1 else ""
        self.strategy: Strategy = build_strategy(cfg.ray.strategy, self.device, cfg.ray.fsdp, ctx.deepspeed, cfg.ray.deepspeed.config)
        # <section>.compile (the autoencoder's and the denoiser's): the loops pass it to strategy.wrap
        self.compile = bool(getattr(getattr(cfg, ctx.section), "compile", False))
        if self.compile:
            prepare_compiler(self.device, f"{ctx.section}.compile")
        self.where = f"{self.world_size} worker(s) on {self.device.type}{spread}"  # the loops' start line

    @property
    def compile_note(self) -> str:
        """For a loop's start line: the first step takes a minute or two when compiled."""
        return ", torch.compile (the first step compiles)" if self.compile else ""

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        return autocast_dtype(precision, self.device)

    def training_compute(self, dtype: torch.dtype | None):
        """A training forward's context: autocast to `dtype`, and on a CPU the math attention kernel (gen_core.training)."""
        return training_compute(self.device, dtype)

    def all_gather(self, obj) -> list:
        """Collective: every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def all_ok(self, ok: bool) -> bool:
        """Collective: whether every rank's `ok` holds."""
        return all(self.all_gather(ok))

    def broadcast(self, obj):
        """Collective: rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box)
        return box[0]


MMAP_THRESHOLD_CEILING = 32 << 20  # glibc's largest M_MMAP_THRESHOLD on 64-bit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int | None = None) -> bool:
    """glibc's mallopt, process-wide: blocks up to `mmap_threshold` bytes from the heap rather than fresh mmap()s, and
    freed heap memory above `trim_threshold` handed back to the kernel (None: glibc's default). False, and nothing
    changed after the first refusal, where the C library has no mallopt (macOS) or refuses a value."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, mmap_threshold):
        return False
    return trim_threshold is None or bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def retain_freed_memory() -> bool:
    """glibc's malloc, set for a training process (process-wide): blocks up to 32 MiB (its ceiling for M_MMAP_THRESHOLD on
    64-bit) come from the heap rather than fresh mmap()s, and freed heap memory stays with the process (M_TRIM_THRESHOLD
    at its largest, 2 GiB - 1: mallopt takes an int) rather than going back to the kernel, so each step's activations
    reuse pages instead of faulting in and zeroing new ones: what PyTorch's caching allocator does on GPUs. On 2 cores
    (benchmarks/glibc_malloc.sh, RESULTS.md): steps 0.97-1.13x (LPIPS autoencoder), 1.02-1.20x (denoiser), 1.01-1.02x
    (GAN), minor page faults -11% to -48%; a whole `make repro` within noise. The trim setting alone is a trap: it turns
    glibc's adaptive mmap threshold off (0.4-0.6x). Values are unchanged, only where memory comes from
    (tests/test_cpu_training.py). False where the C library has no mallopt (macOS) or refuses the values."""
    return set_malloc_thresholds(MMAP_THRESHOLD_CEILING, (1 << 31) - 1)


def start_worker(worker_config: dict) -> tuple[Worker, "Reporter", "CheckpointStore"]:
    """The prologue of every training loop: this worker, its reporter and its checkpoint store."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # workers do not inherit the stage's environment
    retain_freed_memory()  # CPU activations reuse the process's pages instead of fresh mmap()s; values unchanged
    cfg = RunConfig.model_validate(worker_config["run"])
    ctx = RunContext(**worker_config["context"])
    worker = Worker(cfg, ctx)
    report = Reporter(worker)
    return worker, report, CheckpointStore(worker, report)


# ---------------------------------------------------------------------------
# Reporting: progress lines, loss reduction, MLflow metrics
# ---------------------------------------------------------------------------


class Reporter:
    """Progress lines, the loss history and MLflow metrics of one run (rank 0 writes; every rank reduces)."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.section: TrainingConfig = getattr(worker.cfg, worker.ctx.section)
        self.mlflow = None
        if worker.is_chief:  # only rank 0 writes, and importing MLflow costs each process ~1.5 s of CPU
            from mlflow.tracking import MlflowClient

            self.mlflow = MlflowClient(adopt_credentials(worker.ctx.tracking_uri))
        self.history: list[dict] = []
        self.started = time.monotonic()
        self._window_started, self._window_images = time.monotonic(), 0

    def say(self, message: str) -> None:
        # Train V2 echoes print() twice (logger + stdout); the raw stream is forwarded once.
        if self.worker.is_chief:
            sys.__stdout__.write(f"[{self.worker.ctx.stage}] {message}\n")
            sys.__stdout__.flush()

    def step_done(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """After `step` completed steps: count the images; at log and checkpoint steps reduce the losses
        over the ranks (collective), stop on a non-finite one, and log at log steps. -> the mean losses
        at log/checkpoint steps, else None."""
        self._window_images += self.section.global_batch_size
        is_log = self.section.is_log_step(step)
        if not (is_log or self.section.is_checkpoint_step(step)):
            return None
        values = self._mean_losses(step, losses)
        if is_log:
            self._log_progress(step, values)
        return values

    def _mean_losses(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """All-reduced means. Checked at every checkpoint too, so non-finite weights are never saved."""
        stacked = torch.stack([value.detach().float() for value in losses.values()])
        if self.worker.world_size > 1:
            torch.distributed.all_reduce(stacked)
            stacked /= self.worker.world_size
        values = dict(zip(losses, stacked.tolist()))
        if not all(np.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: " + " ".join(f"{k}={v}" for k, v in values.items()))
        return values

    def _log_progress(self, step: int, values: dict[str, float]) -> None:
        s = self.section
        rate = self._window_images / max(time.monotonic() - self._window_started, 1e-9)
        self.history.append({"step": step, **values, "img_per_s": rate})
        eta = (s.total_steps - step) * s.global_batch_size / max(rate, 1e-9)
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.say(f"step {step}/{s.total_steps} {shown} {rate:.0f} img/s eta {format_duration(eta)}")
        self.log_metrics({**values, "img_per_s": rate}, step)
        self._window_started, self._window_images = time.monotonic(), 0

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        if self.mlflow and values:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.worker.ctx.mlflow_run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def log_image(self, png: bytes, step: int) -> None:
        """A sample grid as MLflow's step-keyed image "samples": the run page's image viewer has a step
        slider, and runs compare side by side (synchronous: on disk before the checkpoint is reported)."""
        if self.mlflow:
            from PIL import Image

            image = Image.open(io.BytesIO(png))
            self.mlflow.log_image(self.worker.ctx.mlflow_run_id, image, key="samples", step=step, synchronous=True)

    def resumed(self, meta: dict) -> None:
        step = meta["step"]
        self.say(f"resumed from checkpoint at step {step} ({meta.get('strategy', 'ddp')}, written by {meta.get('world_size')} worker(s))")
        if self.mlflow:  # every resume (a restart after a failure, or a rerun) is a point on this curve
            self.mlflow.set_tag(self.worker.ctx.mlflow_run_id, "resumed_from_step", str(step))
            self.log_metrics({"resumed_from_step": step}, step)

    def finished(self, steps_run: int) -> None:
        self.say(f"finished {steps_run} steps in {format_duration(time.monotonic() - self.started)}")


# ---------------------------------------------------------------------------
# Checkpoint storage
# ---------------------------------------------------------------------------


class CheckpointStore:
    """The run's checkpoints in storage (local or s3://): restore the newest readable one, write new ones.

    Not ray.train.get_checkpoint() for restoring: Train V2 registers a checkpoint only once its
    controller consumes the report, so a worker killed soon after reporting loses it and the restarted
    group would begin again at step 0. Writing goes through ray.train.report, which uploads every
    rank's files into one checkpoint directory and keeps `checkpoints_to_keep` of them."""

    def __init__(self, worker: Worker, report: Reporter):
        self.worker, self.report = worker, report
        self.restored_meta: dict | None = None  # meta.json of the checkpoint restore() loaded
        self.eval_history: list[dict] = []  # the evaluations during training so far (evaluation.csv)
        self.name_suffix = ""  # after passing over newer checkpoints: new checkpoint names get a unique suffix

    def due(self, step: int) -> bool:
        return self.report.section.is_checkpoint_step(step)

    def restore(self, parts: list[Part]) -> int:
        """Collective. Load the newest complete, readable checkpoint into `parts` -> its step, or 0 for a
        run with no checkpoint. Every checkpoint passed over is said in one line. A run whose checkpoints
        all fail to load stops (CheckpointError) rather than train from step 0 over them."""
        worker, skipped = self.worker, []
        found = worker.broadcast(list_checkpoints(worker.ctx.run_uri, skipped) if worker.is_chief else None)  # same order on every rank
        skipped = worker.broadcast(skipped if worker.is_chief else None)
        for uri, why in skipped:
            self.report.say(f"skipping checkpoint {uri}: {why}")
        for uri, meta in found:
            if meta.get("signature") != worker.ctx.signature:
                raise CheckpointError(f"{uri}: checkpoint signature {meta.get('signature')} does not match this run's {worker.ctx.signature}")
            check_resumable(meta, worker.strategy.name, worker.world_size, uri, worker.ctx.section)
            error = ""
            with tempfile.TemporaryDirectory() as directory:
                try:
                    download_directory(uri, directory)
                    worker.strategy.load_parts(parts, Path(directory))
                    load_rng(Path(directory), worker.rank)
                    history = read_history(Path(directory))
                    eval_history = read_history(Path(directory), "evaluation.csv")
                except CheckpointError as err:  # e.g. a copy cut short by the failure itself
                    error = str(err).replace(directory, uri)  # name the checkpoint in storage, not the download
            if not worker.all_ok(not error):
                skipped.append((uri, error or "another rank could not read it"))
                self.report.say(f"skipping unreadable checkpoint {uri}: {error or 'another rank could not read it'}")
                continue
            self.report.history, self.eval_history, self.restored_meta = history, eval_history, meta
            if any(named_step(other) >= meta["step"] for other, _ in skipped):
                # New checkpoints must not reuse a passed-over one's name: Ray's retention still lists the
                # old one and would delete the new one in its place when it retires it.
                self.name_suffix = "_" + worker.broadcast(uuid.uuid4().hex[:6] if worker.is_chief else None)
            self.report.resumed(meta)
            return int(meta["step"])
        if skipped:
            raise CheckpointError(none_loadable(worker.ctx.run_uri, skipped, worker.ctx.section))
        return 0

    @contextlib.contextmanager
    def writing(self, step: int, parts: list[Part], metrics: dict[str, float]) -> Iterator["CheckpointWriter"]:
        """Collective. On entry the strategy has written the training state of `parts` (every rank its
        shards) and this rank's RNG state; the body adds weights, a sample grid, metrics and meta; on
        exit rank 0 writes meta.json (every rank's files with their sizes) and every rank reports."""
        worker, started = self.worker, time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = CheckpointWriter(Path(tmp), step, dict(metrics))
            worker.strategy.save_parts(parts, checkpoint.directory)
            save_rng(checkpoint.directory, worker.rank)
            yield checkpoint
            if checkpoint.evaluation is not None:
                self.eval_history.append({"step": step, **checkpoint.evaluation.values})
            if worker.is_chief:
                (checkpoint.directory / "losses.csv").write_text(history_csv(self.report.history))
                (checkpoint.directory / "evaluation.csv").write_text(history_csv(self.eval_history))
            files = worker.all_gather(checkpoint.files())
            if worker.is_chief:
                write_meta(checkpoint.directory, self._meta(checkpoint, files))
                if checkpoint.grid is not None:
                    self.report.log_image(checkpoint.grid, step)
            has_files = any(checkpoint.directory.iterdir())
            name, reported = f"checkpoint_{step:07d}{self.name_suffix}", {"step": step, **checkpoint.metrics}
            if worker.ctx.in_process:
                self._publish(checkpoint.directory, name, reported)
            else:
                import ray.train

                ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None, checkpoint_dir_name=name)
            if worker.is_chief and checkpoint.evaluation is not None and checkpoint.evaluation.is_best:
                keep_best(worker.ctx.run_uri, checkpoint.directory, step, checkpoint.evaluation.best["value"])
        self.report.say(f"checkpoint at step {step} ({time.monotonic() - started:.1f}s)")

    def _publish(self, directory: Path, name: str, reported: dict) -> None:
        """In process, what Ray Train does with a worker's report: upload the checkpoint into the run's
        directory (meta.json last), keep the newest checkpoints_to_keep, and pass the metrics to the Tune trial."""
        ctx = self.worker.ctx
        upload_directory(directory, f"{ctx.run_uri.rstrip('/')}/{name}")
        retire_checkpoints(ctx.run_uri, self.report.section.checkpoints_to_keep)
        if ctx.tune_reports:
            from ray import tune

            tune.report(reported)

    def _meta(self, checkpoint: "CheckpointWriter", files: list[dict]) -> dict:
        worker, ctx = self.worker, self.worker.ctx
        return {
            "step": checkpoint.step, "signature": ctx.signature, "data_hash": ctx.data_hash, "git_revision": ctx.git_revision,
            "mlflow_run_id": ctx.mlflow_run_id, "strategy": worker.strategy.name, "world_size": worker.world_size,
            "files": {name: size for rank_files in files for name, size in rank_files.items()},
            "config": persisted_config(worker.cfg), **checkpoint.meta,
        }  # fmt: skip


@dataclass
class CheckpointWriter:
    """One checkpoint being written: what the loop adds between the strategy state and the report."""

    directory: Path
    step: int
    metrics: dict[str, float]  # reported with the checkpoint (Tune's schedulers compare these)
    meta: dict = field(default_factory=dict)  # extras for meta.json (e.g. the generator spec)
    grid: bytes | None = None
    evaluation: Evaluation | None = None

    def add_weights(self, state_dicts: dict[str, dict]) -> None:
        """Rank 0: the plain weights that exports read (weights.safetensors)."""
        save_weights(self.directory, state_dicts)

    def add_sample_grid(self, png: bytes) -> None:
        """Rank 0: samples.png, also logged to MLflow under the step."""
        self.grid = png
        (self.directory / "samples.png").write_bytes(png)

    def add_evaluation(self, evaluation: Evaluation) -> None:
        """Every rank: the evaluation at this step, reported with the checkpoint (Tune's schedulers read
        it) and kept in its meta with the best so far; the best checkpoint is also copied to <run>/best/."""
        self.evaluation = evaluation
        self.metrics.update(evaluation.values)
        self.meta.update(evaluation=evaluation.values, evaluation_best=evaluation.best)
        if evaluation.stop:
            self.meta["stopped_early"] = True

    def files(self) -> dict[str, int]:
        return {str(p.relative_to(self.directory)): p.stat().st_size for p in self.directory.rglob("*") if p.is_file()}


def retire_checkpoints(run_uri: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints of a run: what Ray Train's retention does for the
    checkpoints it was reported, also for those written in process (or by an earlier run of the other kind)."""
    fs, _ = filesystem(run_uri)
    for retired, _ in list_checkpoints(run_uri)[keep:]:
        fs.rm(filesystem(retired)[1], recursive=True)


def list_checkpoints(run_uri: str, skipped: list[tuple[str, str]] | None = None) -> list[tuple[str, dict]]:
    """(uri, meta) of every complete checkpoint in a run's storage directory, newest step first.
    Every rank uploads its own files; meta.json lists them all with their sizes, so a checkpoint
    whose upload was cut short (by the failure itself, say) is left out. Each checkpoint left out is
    appended to `skipped` as (uri, why), for the caller to say."""
    fs, path = filesystem(run_uri)
    if not fs.exists(path):
        return []
    scheme = run_uri.split("://")[0] + "://" if "://" in run_uri else ""
    found, skipped = [], skipped if skipped is not None else []
    for info in fs.ls(path, detail=True):
        entry = info["name"].rstrip("/")
        if info["type"] != "directory" or not entry.split("/")[-1].startswith("checkpoint_"):
            continue
        uri = scheme + entry if scheme and not entry.startswith(scheme) else entry
        try:
            meta = json.loads(fs.cat_file(f"{entry}/meta.json"))
        except FileNotFoundError:
            skipped.append((uri, "meta.json missing (written last: the checkpoint is incomplete)"))
            continue
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            skipped.append((uri, f"meta.json is not JSON ({err})"))
            continue
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(meta.get("files", {}), dict):
            skipped.append((uri, "meta.json is malformed (no integer step or no file list)"))
            continue
        present = {name[len(entry) + 1 :]: d["size"] for name, d in fs.find(entry, detail=True).items()}
        short = [name for name, size in meta.get("files", {}).items() if present.get(name) != size]
        if short:
            skipped.append((uri, f"{len(short)} file(s) missing or of the wrong size, e.g. {short[0]}"))
            continue
        found.append((uri, meta))
    return sorted(found, key=lambda item: item[1]["step"], reverse=True)


def none_loadable(run_uri: str, skipped: list[tuple[str, str]], section: str) -> str:
    """The one line for a run whose every checkpoint was passed over (skipped: (uri, why), as listed)."""
    return (f"{run_uri}: none of its {len(skipped)} checkpoint(s) can be loaded, so this run will not start over from step 0 on "
            f"top of them; newest: {skipped[0][0]}: {skipped[0][1]}. Repair or remove them, or set {section}.run_name to train afresh")  # fmt: skip


# The checkpoint files every strategy loads with plain load_state (its own training state, ddp's state.pt
# aside, is in the strategy's format: fsdp/ shards, deepspeed/ partitions with their allow-listed types).
PLAIN_STATE_FILES = ("state.pt", "rng/rank_*.pt")


def refused_state_file(directory: Path) -> str | None:
    """Why the safe loader refuses one of a local checkpoint's plain torch files, or None. Reads each
    file's pickle, mapping the tensors' data (mmap), so it costs little whatever the model's size."""
    for pattern in PLAIN_STATE_FILES:
        for path in sorted(directory.glob(pattern)):
            try:
                load_state(path, mmap=True)
            except CheckpointError as err:
                return str(err)
    return None


def named_step(uri: str) -> int:
    """The step in a checkpoint directory's name (checkpoint_0002000 or checkpoint_0002000_1a2b3c)."""
    try:
        return int(uri.rstrip("/").rsplit("/", 1)[-1].split("_")[1])
    except (IndexError, ValueError):
        return -1


BEST_FILES = ("weights.safetensors", "meta.json", "samples.png", "losses.csv", "evaluation.csv")


def keep_best(run_uri: str, directory: Path, step: int, value: float) -> None:
    """Rank 0: copy what an export reads of the checkpoint in `directory` to <run_uri>/best/checkpoint_<step>,
    then point best/best.json at it (written last: a copy cut short is never pointed at) and drop older copies.
    Ray keeps only the newest checkpoints_to_keep checkpoints; the best one may be older."""
    fs, path = filesystem(run_uri)
    best = f"{path.rstrip('/')}/best"
    target = f"{best}/checkpoint_{step:07d}"
    fs.makedirs(target, exist_ok=True)  # local storage; a no-op on object stores
    for name in BEST_FILES:
        if (directory / name).exists():
            fs.put_file(str(directory / name), f"{target}/{name}")
    with fs.open(f"{best}/best.json", "w") as handle:
        handle.write(json.dumps({"step": step, "value": value, "checkpoint": f"checkpoint_{step:07d}"}))
    for entry in fs.ls(best, detail=False):
        if entry.rstrip("/").split("/")[-1].startswith("checkpoint_") and not entry.rstrip("/").endswith(f"checkpoint_{step:07d}"):
            fs.rm(entry, recursive=True)


def best_checkpoint(run_uri: str) -> tuple[str, dict] | None:
    """(uri, best.json) of the best evaluated checkpoint kept by keep_best, or None."""
    fs, path = filesystem(run_uri)
    pointer = f"{path.rstrip('/')}/best/best.json"
    if not fs.exists(pointer):
        return None
    record = json.loads(fs.cat_file(pointer))
    return f"{run_uri.rstrip('/')}/best/{record['checkpoint']}", record


def history_csv(history: list[dict]) -> str:
    if not history:
        return ""
    buffer = io.StringIO()
    # every column that any row has (a sweep trial's last evaluation adds Inception `fid`), blank where a row has none
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in history for key in row)), restval="")
    writer.writeheader()
    writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in history)
    return buffer.getvalue()


def read_history(directory: Path, name: str = "losses.csv") -> list[dict]:
    path = directory / name
    if not path.exists() or not path.read_text().strip():
        return []
    rows = csv.DictReader(path.read_text().splitlines())
    return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v != ""} for row in rows]


def save_rng(directory: Path, rank: int) -> None:
    """This rank's torch RNG state. The loops draw their noise from per-(step, rank) generators, so a
    resume does not depend on it; it is kept so that any global-RNG use stays resumable too."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    (directory / "rng").mkdir(exist_ok=True)
    torch.save(state, directory / "rng" / f"rank_{rank:03d}.pt")


def load_rng(directory: Path, rank: int) -> None:
    path = directory / "rng" / f"rank_{rank:03d}.pt"
    if path.exists():  # a rank that did not exist in the saving run keeps its seeded state
        state = load_state(path)
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
