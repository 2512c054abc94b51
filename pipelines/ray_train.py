"""The Ray Train driver every training stage shares (GAN, autoencoder, latent denoiser).

A stage provides one loop function (runs on each worker) and an export function; this module
does the rest the same way for all of them:

- the run directory <ray.storage_path>/<ray.run_name>-<family>-<signature>: the same config
  resumes there (also with a larger total_steps), a changed one trains afresh in its own;
- the MLflow run (created once, continued on resume);
- `WorkerSession`: rank, device, autocast, one-line progress, MLflow metrics and images,
  resume from the newest complete checkpoint in storage, checkpoint reports;
- fitting with TorchTrainer and exporting from the final checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gen_core.checkpoint import CheckpointError, load_checkpoint, load_state, write_meta
from gen_core.config import LoopConfig, RunConfig
from gen_core.data import dataset_hash, read_manifest
from gen_core.io import atomic_directory, atomic_write_bytes, download_directory, filesystem
from gen_core.training import autocast_dtype, config_signature
from pipelines.common import StageError, absolute, format_duration, git_revision, log
from pipelines.ray_env import init_ray, run_uri, storage
from pipelines.strategy import Part, build_strategy, check_resumable, deepspeed_config
from pipelines.tracking import connect, tracking_uri


@dataclass(frozen=True)
class LoopContext:
    """Facts the driver resolves once and hands to every worker."""

    stage: str
    data_uri: str
    num_classes: int
    signature: str
    run_uri: str  # this run's checkpoint directory (local path or s3://)
    data_hash: str
    git_revision: str
    tracking_uri: str
    mlflow_run_id: str
    extra: dict = field(default_factory=dict)  # stage-specific inputs (e.g. the autoencoder directory)
    deepspeed: dict | None = None  # ray.strategy deepspeed: the config file, completed for this loop


def run_directory(cfg: RunConfig, family: str, signature: str) -> str:
    return f"{cfg.ray.run_name}-{family}-{signature[:8]}"


# ---------------------------------------------------------------------------
# Checkpoint storage
# ---------------------------------------------------------------------------


def list_checkpoints(run_uri_: str) -> list[tuple[str, dict]]:
    """(uri, meta) of every complete checkpoint in a run's storage directory, newest step first.
    Every rank uploads its own files; meta.json lists them all with their sizes, so a checkpoint
    whose upload was cut short (by the failure itself, say) is left out."""
    fs, path = filesystem(run_uri_)
    if not fs.exists(path):
        return []
    scheme = run_uri_.split("://")[0] + "://" if "://" in run_uri_ else ""
    found = []
    for info in fs.ls(path, detail=True):
        entry = info["name"].rstrip("/")
        if info["type"] != "directory" or not entry.split("/")[-1].startswith("checkpoint_"):
            continue
        try:
            meta = json.loads(fs.cat_file(f"{entry}/meta.json"))
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        present = {name[len(entry) + 1 :]: d["size"] for name, d in fs.find(entry, detail=True).items()}
        if any(present.get(name) != size for name, size in meta.get("files", {}).items()):
            continue
        found.append((scheme + entry if scheme and not entry.startswith(scheme) else entry, meta))
    return sorted(found, key=lambda item: item[1]["step"], reverse=True)


def history_csv(history: list[dict]) -> str:
    if not history:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in history)
    return buffer.getvalue()


def read_history(directory: Path) -> list[dict]:
    path = directory / "losses.csv"
    if not path.exists() or not path.read_text().strip():
        return []
    return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()} for row in csv.DictReader(path.read_text().splitlines())]


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


class WorkerSession:
    """What a training loop needs from Ray Train on one worker. Only rank 0 prints and logs."""

    def __init__(self, loop_config: dict):
        import ray
        import ray.train
        import ray.train.torch
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # workers do not inherit the stage's environment
        self.cfg = RunConfig.model_validate(loop_config["run"])
        self.ctx = LoopContext(**loop_config["context"])
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.strategy = build_strategy(self.cfg.ray.strategy, self.device, self.cfg.ray.fsdp, self.ctx.deepspeed,
                                       self.cfg.ray.deepspeed.config)  # fmt: skip
        self.mlflow = MlflowClient(self.ctx.tracking_uri) if self.rank == 0 else None
        nodes = self._all_gather(ray.get_runtime_context().get_node_id())
        spread = f" across {len(set(nodes))} nodes" if len(set(nodes)) > 1 else ""
        self.where = f"{self.world_size} worker(s) on {self.device.type}{spread}"  # the loops' start line
        self.history: list[dict] = []
        self._window_started, self._window_images = time.monotonic(), 0
        self.started = time.monotonic()
        self._probe = None  # sweep trials only: pipelines.probe.Probe, built on first use (rank 0)

    def autocast_dtype(self, precision: str) -> torch.dtype | None:
        return autocast_dtype(precision, self.device)

    def autocast(self, dtype: torch.dtype | None):
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def say(self, message: str) -> None:
        # Train V2 echoes print() twice (logger + stdout); the raw stream is forwarded once.
        if self.rank == 0:
            sys.__stdout__.write(f"[{self.ctx.stage}] {message}\n")
            sys.__stdout__.flush()

    def restore(self, parts: list[Part]) -> int:
        """Load the newest complete checkpoint in storage into `parts` (collective); -> its step, or 0.
        Not ray.train.get_checkpoint(): Train V2 registers a checkpoint only once its controller
        consumes the report, so a worker killed soon after reporting loses it and the restarted
        group would begin again at step 0."""
        found = [list_checkpoints(self.ctx.run_uri) if self.rank == 0 else None]
        if self.world_size > 1:  # every rank tries the same checkpoints in the same order
            torch.distributed.broadcast_object_list(found)
        for uri, meta in found[0]:
            if meta.get("signature") != self.ctx.signature:
                raise CheckpointError(f"{uri}: checkpoint signature {meta.get('signature')} does not match this run's {self.ctx.signature}")
            check_resumable(meta, self.strategy.name, self.world_size, uri)
            error = ""
            with tempfile.TemporaryDirectory() as directory:
                try:
                    download_directory(uri, directory)
                    self.strategy.load_parts(parts, Path(directory))
                    load_rng(Path(directory), self.rank)
                    history = read_history(Path(directory))
                except CheckpointError as err:  # e.g. a copy cut short by the failure itself
                    error = str(err)
            if not self._all_ok(not error):
                self.say(f"skipping unreadable checkpoint {uri}: {error or 'another rank could not read it'}")
                continue
            self.history = history
            self.say(f"resumed from checkpoint at step {meta['step']} ({meta.get('strategy', 'ddp')}, written by {meta.get('world_size')} worker(s))")
            if self.mlflow:  # every resume (a restart after a failure, or a rerun) is a point on this curve
                self.mlflow.set_tag(self.ctx.mlflow_run_id, "resumed_from_step", str(meta["step"]))
                self.mlflow.log_batch(self.ctx.mlflow_run_id, metrics=self._metrics({"resumed_from_step": meta["step"]}, meta["step"]))
            return int(meta["step"])
        return 0

    def _all_gather(self, obj) -> list:
        """Collective: every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def _all_ok(self, ok: bool) -> bool:
        """Collective: whether every rank's `ok` holds."""
        return all(self._all_gather(ok))

    def count_images(self, images: int) -> None:
        self._window_images += images

    def mean_losses(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """All-reduced means (every rank must call). Non-finite values stop the run before any save."""
        stacked = torch.stack([value.detach().float() for value in losses.values()])
        if self.world_size > 1:
            torch.distributed.all_reduce(stacked)
            stacked /= self.world_size
        values = dict(zip(losses, stacked.tolist()))
        if not all(np.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: " + " ".join(f"{k}={v}" for k, v in values.items()))
        return values

    def log_progress(self, step: int, total_steps: int, global_batch_size: int, values: dict[str, float]) -> None:
        rate = self._window_images / max(time.monotonic() - self._window_started, 1e-9)
        self.history.append({"step": step, **values, "img_per_s": rate})
        eta = (total_steps - step) * global_batch_size / max(rate, 1e-9)
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.say(f"step {step}/{total_steps} {shown} {rate:.0f} img/s eta {format_duration(eta)}")
        if self.mlflow:
            self.mlflow.log_batch(self.ctx.mlflow_run_id, metrics=self._metrics({**values, "img_per_s": rate}, step))
        self._window_started, self._window_images = time.monotonic(), 0

    def probe_metrics(self, step: int, total_steps: int, model: Callable[[], object] | None, amp_dtype) -> dict[str, float]:
        """Sweep trials (context.extra['probe']): sample-quality metrics of model() at fixed seeds, logged
        to MLflow and reported with the checkpoint, so Tune's schedulers can rank trials. Rank 0."""
        spec = self.ctx.extra.get("probe")
        if not spec or model is None or self.rank != 0:
            return {}
        if self._probe is None:
            from pipelines.probe import Probe

            self._probe = Probe(spec, self.device)
        started = time.monotonic()
        values = self._probe(model(), final=step == spec.get("final_step", total_steps), amp_dtype=amp_dtype)
        self.say(f"probe at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in values.items()) + f" ({time.monotonic() - started:.1f}s)")
        if self.mlflow:
            self.mlflow.log_batch(self.ctx.mlflow_run_id, metrics=self._metrics(values, step))
        return values

    @staticmethod
    def _metrics(values: dict[str, float], step: int) -> list:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(k, float(v), now, step) for k, v in values.items()]

    def checkpoint(self, step: int, parts: list[Part], build: Callable[[Path], dict], metrics: dict,
                   probe: Callable[[], dict] | None = None) -> None:  # fmt: skip
        """Collective. The strategy writes the training state of `parts` in its own form (every rank its
        shards), then build(directory) runs on every rank (it may gather weights) and, on rank 0, writes
        weights.safetensors / samples.png and returns meta extras. probe() -> extra metrics (rank 0,
        after build) that go with the report and into the meta. Each rank reports its own files; Ray
        puts them in one checkpoint directory, and meta.json lists them all."""
        import ray.train

        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            self.strategy.save_parts(parts, directory)
            save_rng(directory, self.rank)
            extras = build(directory)
            if self.rank == 0:
                (directory / "losses.csv").write_text(history_csv(self.history))
            files = self._all_gather({str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()})
            if self.rank == 0:
                extra = probe() if probe is not None else {}
                if extra:
                    metrics = {**metrics, **extra}
                    extras = {**extras, "probe": metrics}
                meta = {"step": step, "signature": self.ctx.signature, "data_hash": self.ctx.data_hash,
                        "git_revision": self.ctx.git_revision, "mlflow_run_id": self.ctx.mlflow_run_id,
                        "strategy": self.strategy.name, "world_size": self.world_size,
                        "files": {name: size for rank_files in files for name, size in rank_files.items()},
                        "config": self.cfg.model_dump(mode="json"), **extras}  # fmt: skip
                write_meta(directory, meta)
                grid = directory / "samples.png"
                if self.mlflow and grid.exists():  # under its step's name, from a directory of its own (trials run side by side)
                    with tempfile.TemporaryDirectory() as upload:
                        named = Path(upload) / f"step_{step:07d}.png"
                        named.write_bytes(grid.read_bytes())
                        self.mlflow.log_artifact(self.ctx.mlflow_run_id, str(named), artifact_path="samples")
            has_files = any(directory.iterdir())
            ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None,
                             checkpoint_dir_name=f"checkpoint_{step:07d}")  # fmt: skip
        self.say(f"checkpoint at step {step} ({time.monotonic() - started:.1f}s)")

    def end_step(self, step: int, loop: LoopConfig, losses: dict[str, torch.Tensor], parts: list[Part],
                 build: Callable[[Path, int], dict], sampler: Callable[[], object] | None = None) -> None:  # fmt: skip
        """After `step` completed steps: count the images, then at log/checkpoint steps check the losses
        (every rank joins the reduce), log progress, and checkpoint `parts` with build(directory, step).
        Checked at every checkpoint too, so non-finite weights are never saved. sampler() -> the model to
        judge (gen_core.generators interface, rank 0, after build), used only in sweep trials."""
        self.count_images(loop.global_batch_size)
        is_log, is_checkpoint = schedule(step, loop.total_steps, loop.log_every_steps, loop.checkpoint_every_steps)
        if not (is_log or is_checkpoint):
            return
        values = self.mean_losses(step, losses)
        if is_log:
            self.log_progress(step, loop.total_steps, loop.global_batch_size, values)
        if is_checkpoint:
            probe = lambda: self.probe_metrics(step, loop.total_steps, sampler, self.autocast_dtype(loop.precision))  # noqa: E731
            self.checkpoint(step, parts, lambda directory: build(directory, step), values, probe)

    def finished(self, steps_run: int) -> None:
        self.say(f"finished {steps_run} steps in {format_duration(time.monotonic() - self.started)}")


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


def schedule(step: int, total_steps: int, every_log: int, every_checkpoint: int) -> tuple[bool, bool]:
    """(is_log, is_checkpoint) after completing `step` steps; the last step is always both."""
    last = step == total_steps
    return step % every_log == 0 or last, step % every_checkpoint == 0 or last


# ---------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------


def _root_cause(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else type(err).__name__


def flat_params(cfg: RunConfig, sections: tuple[str, ...]) -> dict[str, str]:
    out = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out[f"{prefix}{key}"] = str(value)

    dumped = cfg.model_dump(mode="json")
    walk("", {name: dumped[name] for name in sections})
    return out


@dataclass(frozen=True)
class TrainingJob:
    """One training stage, described for the shared driver."""

    stage: str  # e.g. "train_ldm"
    family: str  # run-directory and MLflow tag: gan | autoencoder | ldm | pixel
    section: str  # the params section with the loop settings (gan | autoencoder | ldm)
    loop: Callable[[dict], None]
    signature: dict  # what a checkpoint must share with this run to be resumed
    export: Callable[[RunConfig, str, LoopContext, object], dict]  # (cfg, checkpoint_uri, context, mlflow) -> meta
    extra: dict = field(default_factory=dict)
    logged_sections: tuple[str, ...] = ("data", "ray")


def job_signature(job: TrainingJob, num_classes: int) -> str:
    """What names the run directory and must match for a checkpoint to be resumed."""
    return config_signature({**job.signature, "num_classes": num_classes, "family": job.family})


def train(cfg: RunConfig, job: TrainingJob, *, callbacks: tuple = (), parent_run_id: str | None = None,
          run_tags: dict | None = None) -> dict:  # fmt: skip
    """Train (or resume, or only export) one job. `callbacks` go to the TorchTrainer (a sweep passes
    Tune's report callback); `parent_run_id` makes a new MLflow run a child run (one per sweep trial)."""
    logger = log(job.stage)
    loop_cfg = getattr(cfg, job.section)
    data_uri = absolute(cfg.data.out_dir)
    manifest = read_manifest(data_uri)
    num_classes = len(manifest["class_names"])
    if manifest["shape"] != [cfg.data.channels, cfg.data.resolution, cfg.data.resolution]:
        raise StageError(f"{data_uri}: prepared shape {manifest['shape']} does not match data.channels/resolution")
    signature = job_signature(job, num_classes)
    run_dir = run_directory(cfg, job.family, signature)
    checkpoints = list_checkpoints(run_uri(cfg, run_dir))
    existing = checkpoints[0] if checkpoints else None
    deepspeed = None
    if cfg.ray.strategy == "deepspeed":  # the file is read here: workers may run elsewhere
        deepspeed = deepspeed_config(absolute(cfg.ray.deepspeed.config), loop_cfg.global_batch_size, cfg.ray.num_workers)
    checkpoint_uri = None  # None: train (afresh or resumed), else only export this checkpoint
    if existing and existing[1]["step"] > loop_cfg.total_steps:
        exact = [uri for uri, meta in checkpoints if meta["step"] == loop_cfg.total_steps]
        if not exact:  # exporting the later model would record the wrong step count in dvc.lock and MLflow
            raise StageError(
                f"{run_uri(cfg, run_dir)}: already trained to step {existing[1]['step']}, past {job.section}.total_steps "
                f"{loop_cfg.total_steps}, with no checkpoint at that step; set ray.run_name to train afresh"
            )
        logger.info("run %s has a checkpoint at step %d; exporting it", run_dir, loop_cfg.total_steps)
        checkpoint_uri = exact[0]
    elif existing and existing[1]["step"] == loop_cfg.total_steps:
        logger.info("run %s already trained to step %d; exporting", run_dir, existing[1]["step"])
        checkpoint_uri = existing[0]
    elif existing:
        check_resumable(existing[1], cfg.ray.strategy, cfg.ray.num_workers, run_uri(cfg, run_dir))  # before Ray starts
        logger.info("resuming run %s from step %d (%s)", run_dir, existing[1]["step"], cfg.ray.strategy)
    else:
        logger.info("new run %s in %s", run_dir, cfg.ray.storage_path)

    mlflow = connect(cfg)
    run_id = existing[1]["mlflow_run_id"] if existing else None
    data_hash, revision = dataset_hash(data_uri), git_revision()
    run_name = None if run_id else f"{cfg.ray.run_name}-{job.family}"
    with mlflow.start_run(run_id=run_id, run_name=run_name, parent_run_id=None if run_id else parent_run_id) as active:
        if existing is None:
            mlflow.log_params(flat_params(cfg, (job.section, *job.logged_sections)))
            mlflow.set_tags({"git_revision": revision, "data_hash": data_hash, "model_family": job.family, **(run_tags or {})})
        context = LoopContext(
            stage=job.stage, data_uri=data_uri, num_classes=num_classes, signature=signature, run_uri=run_uri(cfg, run_dir),
            data_hash=data_hash, git_revision=revision, tracking_uri=tracking_uri(cfg), mlflow_run_id=active.info.run_id,
            extra=job.extra, deepspeed=deepspeed,
        )  # fmt: skip
        if checkpoint_uri is None:
            checkpoint_uri = fit(cfg, job, context, run_dir, callbacks)
        return job.export(cfg, checkpoint_uri, context, mlflow)


def fit(cfg: RunConfig, job: TrainingJob, context: LoopContext, run_dir: str, callbacks: tuple = ()) -> str:
    import ray as ray_module

    owns_ray = not ray_module.is_initialized()  # inside a Tune trial Ray is already up and not ours to stop
    ray = init_ray(cfg)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = storage(cfg)
    trainer = TorchTrainer(
        job.loop,
        train_loop_config={"run": cfg.model_dump(mode="json"), "context": asdict(context)},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=run_dir, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=getattr(cfg, job.section).checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures), callbacks=list(callbacks) or None,
        ),
    )  # fmt: skip
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker failures; surface the root cause in one line
        raise StageError(f"training failed: {_root_cause(err)}") from None
    finally:
        if owns_ray:
            ray.shutdown()
    if result.checkpoint is None:
        raise StageError("training finished without a checkpoint")
    if storage_fs:  # pyarrow paths drop the scheme; keep a URI that fsspec can open
        return f"{cfg.ray.storage_path.rstrip('/')}/{run_dir}/{Path(result.checkpoint.path).name}"
    return result.checkpoint.path


def fetch_checkpoint(checkpoint_uri: str, local: str) -> tuple[dict, dict]:
    """-> (weights: {name: state_dict}, meta) of a checkpoint, downloaded into `local`."""
    download_directory(checkpoint_uri, local)
    return load_checkpoint(local)


def export_provenance(meta: dict, checkpoint_uri: str, context: LoopContext) -> dict:
    """What every exported model records about where it came from."""
    return {
        "step": meta["step"], "data_hash": meta["data_hash"], "git_revision": meta["git_revision"],
        "mlflow_run_id": meta["mlflow_run_id"], "checkpoint": checkpoint_uri,
        "class_names": read_manifest(context.data_uri)["class_names"], "config": meta["config"],
    }  # fmt: skip


def publish_export(loop: LoopConfig, local: str, mlflow, write: Callable[[Path], None]) -> None:
    """write(tmp) fills the export directory, which gets the checkpoint's samples.png and replaces
    <loop.out_dir> atomically; the loss history goes to loop.losses_file; the checkpoint to MLflow."""
    with atomic_directory(loop.out_dir) as tmp:
        write(tmp)
        (tmp / "samples.png").write_bytes((Path(local) / "samples.png").read_bytes())
    atomic_write_bytes(loop.losses_file, (Path(local) / "losses.csv").read_bytes())
    mlflow.log_artifacts(local, artifact_path="checkpoint")
