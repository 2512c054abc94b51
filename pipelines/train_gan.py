"""Stage `train_gan`: a class-conditional DCGAN on Ray Train (DDP over gloo on CPU, nccl on GPU).

    python -m pipelines.train_gan [--params params.yaml] [--set train.total_steps=100]
    ray job submit --working-dir . -- python -m pipelines.train_gan --set data.out_dir=/abs/path

Checkpoints live in <ray.storage_path>/<ray.run_name>-<config signature>. A rerun with the same
model/optimizer config resumes from the latest checkpoint there (the step count continues, also
when total_steps grew); a changed config trains afresh in its own directory. Outputs: <train.out_dir>/ (EMA generator as
safetensors + generator.json + samples.png) and train.losses_file (DVC plots).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen_core.checkpoint import CheckpointError, export_generator, load_training_state, save_training_state
from gen_core.config import RunConfig
from gen_core.data import dataset_hash, load_split, read_manifest
from gen_core.io import atomic_directory, atomic_write_bytes, download_directory, filesystem
from gen_core.losses import discriminator_loss, generator_loss
from gen_core.models import (
    Discriminator, DiscriminatorSpec, Generator, GeneratorSpec, ema_beta, recalibrate_batchnorm, requires_grad, update_ema,
)
from gen_core.sampling import image_grid, sample_gan, to_uint8, to_unit
from gen_core.training import autocast_dtype, batch_indices, config_signature, step_generator
from pipelines.common import StageError, absolute, format_duration, git_revision, log, run_stage
from pipelines.ray_env import init_ray, run_uri, storage
from pipelines.tracking import connect, tracking_uri

HISTORY_FIELDS = ("step", "d_loss", "g_loss", "img_per_s")


@dataclass(frozen=True)
class LoopContext:
    """Facts the driver resolves once and hands to every worker."""

    data_uri: str
    num_classes: int
    signature: str
    run_uri: str  # this run's checkpoint directory (local path or s3://)
    data_hash: str
    git_revision: str
    tracking_uri: str
    mlflow_run_id: str


def model_specs(cfg: RunConfig, num_classes: int) -> tuple[GeneratorSpec, DiscriminatorSpec]:
    m = cfg.train.model
    return (
        GeneratorSpec(cfg.data.resolution, cfg.data.channels, num_classes, m.z_dim, m.g_width),
        DiscriminatorSpec(cfg.data.resolution, cfg.data.channels, num_classes, m.d_width, m.spectral_norm),
    )


def run_directory(cfg: RunConfig, signature: str) -> str:
    return f"{cfg.ray.run_name}-{signature[:8]}"


def resume_signature(cfg: RunConfig, num_classes: int) -> str:
    """What a checkpoint must share with this run to be resumed (total_steps may grow, lrs may not change)."""
    t = cfg.train
    return config_signature({
        "model": t.model.model_dump(), "loss": t.loss, "resolution": cfg.data.resolution, "channels": cfg.data.channels,
        "num_classes": num_classes, "global_batch_size": t.global_batch_size, "lr": [t.lr_g, t.lr_d],
        "betas": [t.adam_beta1, t.adam_beta2], "seed": t.seed, "d_steps": t.d_steps_per_g_step,
        "ema": [t.ema_halflife_kimg, t.ema_rampup_ratio],
    })  # fmt: skip


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _history_csv(history: list[tuple]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HISTORY_FIELDS)
    writer.writerows((step, f"{d:.6f}", f"{g:.6f}", f"{r:.1f}") for step, d, g, r in history)
    return buffer.getvalue()


def _read_history(directory: Path) -> list[tuple]:
    path = directory / "losses.csv"
    if not path.exists():
        return []
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return [(int(r["step"]), float(r["d_loss"]), float(r["g_loss"]), float(r["img_per_s"])) for r in rows]


def sample_grid_png(G: torch.nn.Module, num_classes: int, seed: int, per_class: int = 8) -> bytes:
    """One row per class, `per_class` fixed seeds per row: the same grid at every checkpoint."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    seeds = [seed + i for i in range(len(labels))]
    device = next(G.parameters()).device
    images = to_uint8(sample_gan(G, labels, seeds, device).cpu())
    grid = image_grid(images, rows=num_classes)
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)
# ---------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # workers do not inherit the stage's environment
    cfg = RunConfig.model_validate(loop_config["run"])
    ctx = LoopContext(**loop_config["context"])
    t = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    amp_dtype = autocast_dtype(t.precision, device)
    per_worker_batch_size = t.global_batch_size // world_size
    mlflow = MlflowClient(ctx.tracking_uri) if rank == 0 else None

    def say(message: str) -> None:
        # Train V2 echoes print() twice (logger + stdout); the raw stream is forwarded once.
        if rank == 0:
            sys.__stdout__.write(f"[train_gan] {message}\n")
            sys.__stdout__.flush()

    # --- data: every rank holds the (small, uint8) train split; batches are seeded per step
    split = load_split(ctx.data_uri, "train")
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)

    # --- models and optimizers (same seeded init everywhere; DDP also broadcasts rank 0's)
    torch.manual_seed(t.seed)
    g_spec, d_spec = model_specs(cfg, ctx.num_classes)
    G, D = Generator(g_spec).to(device), Discriminator(d_spec).to(device)
    G_ema = copy.deepcopy(G).eval()
    requires_grad(G_ema, False)
    opt_G = torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=(t.adam_beta1, t.adam_beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=(t.adam_beta1, t.adam_beta2))

    # --- resume from the newest complete checkpoint in storage. Not ray.train.get_checkpoint():
    # Train V2 registers a checkpoint only once its controller consumes the report, so a worker
    # killed soon after reporting loses it and the restarted group would begin again at step 0.
    start_step, history = 0, []
    state = None
    for uri, _ in list_checkpoints(ctx.run_uri):
        try:
            with tempfile.TemporaryDirectory() as directory:
                download_directory(uri, directory)
                state, _ = load_training_state(directory)
                history = _read_history(Path(directory))
            break
        except CheckpointError as err:  # e.g. a copy cut short by the failure itself
            say(f"skipping unreadable checkpoint: {err}")
    if state is not None:
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        G_ema.load_state_dict(state["G_ema"])
        opt_G.load_state_dict(state["opt_G"])
        opt_D.load_state_dict(state["opt_D"])
        torch.set_rng_state(state["rng"]["torch"])
        start_step = int(state["step"])
        say(f"resumed from checkpoint at step {start_step}")
        if mlflow:
            mlflow.set_tag(ctx.mlflow_run_id, "resumed_from_step", str(start_step))

    G_train = ray.train.torch.prepare_model(G)  # DDP when world_size > 1
    D_train = ray.train.torch.prepare_model(D)
    say(
        f"{world_size} worker(s) on {device.type} ({torch.get_num_threads()} threads each), {'bf16' if amp_dtype else 'fp32'}, "
        f"global batch {t.global_batch_size}, steps {start_step}->{t.total_steps}"
    )

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    window_started, window_images = time.monotonic(), 0
    run_started = time.monotonic()
    for step in range(start_step, t.total_steps):
        noise = step_generator(t.seed, step, rank)
        index = batch_indices(step, t.global_batch_size, len(labels), t.seed, rank, world_size)
        real, y = to_unit(images[index]).to(device), labels[index].to(device)

        # --- D step(s): fakes from the unwrapped G under no_grad, no G gradients needed
        for _ in range(t.d_steps_per_g_step):
            z = torch.randn(per_worker_batch_size, g_spec.z_dim, generator=noise).to(device)
            with torch.no_grad(), autocast():
                fake = _unwrap(G_train)(z, y)
            with autocast():
                d_loss = discriminator_loss(t.loss, D_train, real, fake, y).mean()
            opt_D.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_D.step()

        # --- G step: D frozen and called unwrapped, so DDP reduces only G's gradients
        requires_grad(D, False)
        z = torch.randn(per_worker_batch_size, g_spec.z_dim, generator=noise).to(device)
        with autocast():
            g_loss = generator_loss(t.loss, D, G_train(z, y), y).mean()
        opt_G.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_G.step()
        requires_grad(D, True)

        # --- EMA of G (identical on every rank: DDP keeps G identical)
        update_ema(G_ema, G, ema_beta(t.global_batch_size, (step + 1) * t.global_batch_size, t.ema_halflife_kimg, t.ema_rampup_ratio))
        window_images += t.global_batch_size

        # --- loss check + logging (all ranks join the reduce; rank 0 prints and logs).
        # Checked at every checkpoint too, so non-finite weights are never saved.
        done = step + 1
        is_checkpoint = done % t.checkpoint_every_steps == 0 or done == t.total_steps
        is_log = done % t.log_every_steps == 0 or done == t.total_steps
        if is_log or is_checkpoint:
            losses = torch.stack([d_loss.detach().float(), g_loss.detach().float()])
            if world_size > 1:
                torch.distributed.all_reduce(losses)
                losses /= world_size
            d_value, g_value = losses.tolist()
            if not (np.isfinite(d_value) and np.isfinite(g_value)):
                raise FloatingPointError(f"non-finite loss at step {done}: d_loss={d_value} g_loss={g_value}")
        if is_log:
            rate = window_images / (time.monotonic() - window_started)
            history.append((done, d_value, g_value, rate))
            eta = (t.total_steps - done) * t.global_batch_size / rate
            say(f"step {done}/{t.total_steps} d_loss {d_value:.4f} g_loss {g_value:.4f} {rate:.0f} img/s eta {format_duration(eta)}")
            if mlflow:
                now = int(time.time() * 1000)
                mlflow.log_batch(ctx.mlflow_run_id, metrics=[
                    Metric("d_loss", d_value, now, done), Metric("g_loss", g_value, now, done), Metric("img_per_s", rate, now, done),
                ])  # fmt: skip
            window_started, window_images = time.monotonic(), 0

        # --- checkpoint (every rank reports; rank 0 attaches the state)
        if is_checkpoint:
            with tempfile.TemporaryDirectory() as directory:
                ray_checkpoint = None
                if rank == 0:
                    recalibrate_batchnorm(G_ema, seed=t.seed)  # standing stats for the EMA weights
                    state = {
                        "G": _unwrap(G_train).state_dict(), "D": _unwrap(D_train).state_dict(), "G_ema": G_ema.state_dict(),
                        "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "step": done,
                        "rng": {"torch": torch.get_rng_state()},
                    }  # fmt: skip
                    meta = {
                        "step": done, "signature": ctx.signature, "generator_spec": g_spec.to_dict(),
                        "data_hash": ctx.data_hash, "git_revision": ctx.git_revision, "mlflow_run_id": ctx.mlflow_run_id,
                        "world_size": world_size, "config": cfg.model_dump(mode="json"),
                    }  # fmt: skip
                    save_training_state(directory, state, meta)
                    (Path(directory) / "losses.csv").write_text(_history_csv(history))
                    grid = sample_grid_png(G_ema, ctx.num_classes, t.sample_grid_seed)
                    (Path(directory) / "samples.png").write_bytes(grid)
                    if mlflow:
                        grid_path = Path(directory) / f"step_{done:07d}.png"
                        grid_path.write_bytes(grid)
                        mlflow.log_artifact(ctx.mlflow_run_id, str(grid_path), artifact_path="samples")
                        grid_path.unlink()
                    ray_checkpoint = ray.train.Checkpoint.from_directory(directory)
                ray.train.report({"step": done, "d_loss": d_loss.item(), "g_loss": g_loss.item()}, checkpoint=ray_checkpoint)
            say(f"checkpoint at step {done}")
    say(f"finished {t.total_steps - start_step} steps in {format_duration(time.monotonic() - run_started)}")


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def list_checkpoints(run_uri_: str) -> list[tuple[str, dict]]:
    """(uri, meta) of every checkpoint in a run's storage directory, newest step first.
    meta.json is written last, so a checkpoint without it is incomplete and left out."""
    fs, path = filesystem(run_uri_)
    if not fs.exists(path):
        return []
    scheme = run_uri_.split("://")[0] + "://" if "://" in run_uri_ else ""
    found = []
    for info in fs.ls(path, detail=True):
        entry = info["name"]
        if info["type"] != "directory" or not entry.rstrip("/").split("/")[-1].startswith("checkpoint_"):
            continue
        try:
            found.append((scheme + entry if scheme and not entry.startswith(scheme) else entry, json.loads(fs.cat_file(f"{entry}/meta.json"))))
        except FileNotFoundError:
            continue
    return sorted(found, key=lambda item: item[1]["step"], reverse=True)


def latest_checkpoint(cfg: RunConfig, run_dir: str) -> tuple[str, dict] | None:
    checkpoints = list_checkpoints(run_uri(cfg, run_dir))
    return checkpoints[0] if checkpoints else None


def _root_cause(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else type(err).__name__


def flat_params(cfg: RunConfig) -> dict[str, str]:
    out = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out[f"{prefix}{key}"] = str(value)

    walk("", cfg.model_dump(mode="json"))
    return out


def run(cfg: RunConfig) -> dict:
    logger = log("train_gan")
    data_uri = absolute(cfg.data.out_dir)
    manifest = read_manifest(data_uri)
    num_classes = len(manifest["class_names"])
    if manifest["shape"] != [cfg.data.channels, cfg.data.resolution, cfg.data.resolution]:
        raise StageError(f"{data_uri}: prepared shape {manifest['shape']} does not match data.channels/resolution")
    signature = resume_signature(cfg, num_classes)
    run_dir = run_directory(cfg, signature)
    existing = latest_checkpoint(cfg, run_dir)
    mlflow = connect(cfg)
    run_id = existing[1]["mlflow_run_id"] if existing else None
    data_hash, revision = dataset_hash(data_uri), git_revision()
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.ray.run_name) as active:
        if existing is None:
            mlflow.log_params(flat_params(cfg))
            mlflow.set_tags({"git_revision": revision, "data_hash": data_hash, "model_family": "gan"})
        context = LoopContext(
            data_uri=data_uri, num_classes=num_classes, signature=signature, run_uri=run_uri(cfg, run_dir),
            data_hash=data_hash, git_revision=revision, tracking_uri=tracking_uri(cfg), mlflow_run_id=active.info.run_id,
        )  # fmt: skip
        if existing and existing[1]["step"] >= cfg.train.total_steps:
            logger.info("run %s already trained to step %d; exporting", run_dir, existing[1]["step"])
            checkpoint_uri = existing[0]
        else:
            if existing:
                logger.info("resuming run %s from step %d", run_dir, existing[1]["step"])
            else:
                logger.info("new run %s in %s", run_dir, cfg.ray.storage_path)
            checkpoint_uri = _fit(cfg, context, run_dir)
        return _export(cfg, checkpoint_uri, context, mlflow)


def _fit(cfg: RunConfig, context: LoopContext, run_dir: str) -> str:
    ray = init_ray(cfg)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = storage(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.model_dump(mode="json"), "context": asdict(context)},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=run_dir, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )  # fmt: skip
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker failures; surface the root cause in one line
        raise StageError(f"training failed: {_root_cause(err)}") from None
    finally:
        ray.shutdown()
    if result.checkpoint is None:
        raise StageError("training finished without a checkpoint")
    if storage_fs:  # pyarrow paths drop the scheme; keep a URI that fsspec can open
        return f"{cfg.ray.storage_path.rstrip('/')}/{run_dir}/{Path(result.checkpoint.path).name}"
    return result.checkpoint.path


def _export(cfg: RunConfig, checkpoint_uri: str, context: LoopContext, mlflow) -> dict:
    """EMA generator -> <train.out_dir> (safetensors), loss history -> DVC plots, checkpoint -> MLflow."""
    logger = log("train_gan")
    with tempfile.TemporaryDirectory() as local:
        download_directory(checkpoint_uri, local)
        state, meta = load_training_state(local)
        export_meta = {
            "generator_spec": meta["generator_spec"], "step": meta["step"], "data_hash": meta["data_hash"],
            "git_revision": meta["git_revision"], "mlflow_run_id": meta["mlflow_run_id"], "checkpoint": checkpoint_uri,
            "class_names": read_manifest(context.data_uri)["class_names"], "config": meta["config"],
        }  # fmt: skip
        with atomic_directory(cfg.train.out_dir) as tmp:
            export_generator(tmp, state["G_ema"], export_meta)
            (tmp / "samples.png").write_bytes((Path(local) / "samples.png").read_bytes())
        atomic_write_bytes(cfg.train.losses_file, (Path(local) / "losses.csv").read_bytes())
        mlflow.log_artifacts(local, artifact_path="checkpoint")
    logger.info("exported EMA generator at step %d -> %s", meta["step"], cfg.train.out_dir)
    return export_meta


def main() -> None:
    run_stage("train_gan", lambda cfg, args: run(cfg) and None)


if __name__ == "__main__":
    main()
