"""Stage `train_gan`: a class-conditional DCGAN on Ray Train (ray.strategy: ddp | fsdp | deepspeed; gloo on CPU, nccl on GPU).

    python -m pipelines.train_gan [--params params.yaml] [--set gan.total_steps=100]
    ray job submit --working-dir . -- python -m pipelines.train_gan --set data.out_dir=/abs/path

Checkpoints live in <ray.storage_path>/<ray.run_name>-gan-<config signature> (pipelines.ray_train).
A rerun with the same model/optimizer config resumes from the latest checkpoint there (the step
count continues, also when total_steps grew); a changed config trains afresh in its own directory.
Outputs: <gan.out_dir>/ (EMA generator as safetensors + generator.json + samples.png) and
gan.losses_file (DVC plots).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen_core.checkpoint import export_generator, save_weights
from gen_core.config import RunConfig
from gen_core.data import load_split
from gen_core.generators import GanGenerator
from gen_core.losses import discriminator_loss, generator_loss
from gen_core.models import (
    Discriminator, DiscriminatorSpec, Generator, GeneratorSpec, ema_beta, recalibrate_batchnorm,
)
from gen_core.sampling import image_grid, sample_gan, to_uint8, to_unit
from gen_core.training import batch_indices, step_generator
from pipelines.common import log, run_stage
from pipelines.ray_train import (
    LoopContext, TrainingJob, WorkerSession, export_provenance, fetch_checkpoint, publish_export, train,
)
from pipelines.strategy import Part


def model_specs(cfg: RunConfig, num_classes: int) -> tuple[GeneratorSpec, DiscriminatorSpec]:
    m = cfg.gan.model
    return (
        GeneratorSpec(cfg.data.resolution, cfg.data.channels, num_classes, m.z_dim, m.g_width),
        DiscriminatorSpec(cfg.data.resolution, cfg.data.channels, num_classes, m.d_width, m.spectral_norm),
    )


def resume_signature(cfg: RunConfig) -> dict:
    """What a checkpoint must share with this run to be resumed (total_steps may grow, lrs may not change)."""
    t = cfg.gan
    return {
        "model": t.model.model_dump(), "loss": t.loss, "resolution": cfg.data.resolution, "channels": cfg.data.channels,
        "global_batch_size": t.global_batch_size, "lr": [t.lr_g, t.lr_d], "betas": [t.adam_beta1, t.adam_beta2],
        "seed": t.seed, "d_steps": t.d_steps_per_g_step, "ema": [t.ema_halflife_kimg, t.ema_rampup_ratio],
    }  # fmt: skip


def png_bytes(grid: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_grid_png(G: torch.nn.Module, num_classes: int, seed: int, per_class: int = 8) -> bytes:
    """One row per class, `per_class` fixed seeds per row: the same grid at every checkpoint."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    seeds = [seed + i for i in range(len(labels))]
    device = next(G.parameters()).device
    images = to_uint8(sample_gan(G, labels, seeds, device).cpu())
    return png_bytes(image_grid(images, rows=num_classes))


# ---------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)
# ---------------------------------------------------------------------------


def gan_step(G: Part, D: Part, real: torch.Tensor, labels: torch.Tensor, noise: torch.Generator, z_dim: int, loss: str,
             d_steps: int, autocast) -> dict[str, torch.Tensor]:  # fmt: skip
    """One G step after `d_steps` D steps on this rank's share of the batch, under any strategy.
    -> {"d_loss", "g_loss"} (this rank's means). `autocast` is a context-manager factory."""
    n, device = len(labels), real.device
    for _ in range(d_steps):
        # D step: fakes from G's plain forward under no_grad (no G gradients, nothing to sync)
        z = torch.randn(n, z_dim, generator=noise).to(device)
        with torch.no_grad(), autocast():
            fake = G.module(z, labels)
        with autocast():
            d_loss = discriminator_loss(loss, D.train, real, fake, labels).mean()
        D.backward(d_loss)
        D.step()
    # G step: D frozen and called as its plain module, so only G's gradients are reduced. Under
    # DeepSpeed this is required, not an optimisation: an unfrozen D makes ZeRO-1 update wrongly (STACK.md)
    z = torch.randn(n, z_dim, generator=noise).to(device)
    with D.frozen() as frozen_D, autocast():
        g_loss = generator_loss(loss, frozen_D, G.train(z, labels), labels).mean()
    G.backward(g_loss)
    G.step()
    return {"d_loss": d_loss, "g_loss": g_loss}


def train_loop_per_worker(loop_config: dict) -> None:
    session = WorkerSession(loop_config)
    cfg, ctx, device, strategy = session.cfg, session.ctx, session.device, session.strategy
    t = cfg.gan
    amp_dtype = session.autocast_dtype(t.precision)

    # --- data: every rank holds the (small, uint8) train split; batches are seeded per step
    split = load_split(ctx.data_uri, "train")
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)

    # --- models and optimizers (same seeded init everywhere), wrapped by the strategy
    torch.manual_seed(t.seed)
    g_spec, d_spec = model_specs(cfg, ctx.num_classes)
    # channels_last: the bf16 conv kernels (oneDNN/AMX on CPU, tensor cores on GPU) prefer NHWC; measured
    # 1.2x on the D+G step here. Not for the diffusers models, where GroupNorm made it 0.8x (RESULTS.md).
    # DDP only: FSDP2 refuses non-contiguous parameters and ZeRO flattens them into flat buffers.
    layout = torch.channels_last if strategy.name == "ddp" else torch.contiguous_format
    G = Generator(g_spec).to(device, memory_format=layout)
    D = Discriminator(d_spec).to(device, memory_format=layout)
    betas = (t.adam_beta1, t.adam_beta2)
    G = strategy.wrap("G", G, lambda params: torch.optim.Adam(params, lr=t.lr_g, betas=betas), ema=True)
    D = strategy.wrap("D", D, lambda params: torch.optim.Adam(params, lr=t.lr_d, betas=betas))
    start_step = session.restore([G, D])
    G.set_learning_rate(t.lr_g)  # the config's: a PBT hand-off resumes another trial's state with new rates
    D.set_learning_rate(t.lr_d)
    session.say(
        f"{session.where} ({torch.get_num_threads()} threads each), {strategy.describe()}, "
        f"{'bf16' if amp_dtype else 'fp32'}, global batch {t.global_batch_size}, steps {start_step}->{t.total_steps}"
    )

    judged = {}  # rank 0: the EMA generator gathered at the last checkpoint (sample grid, sweep probe)

    def build_checkpoint(directory: Path, step: int) -> dict:
        G_ema = strategy.gather(G, "ema")  # collective
        if session.rank == 0:
            recalibrate_batchnorm(G_ema, seed=t.seed)  # standing stats for the EMA weights
            (directory / "samples.png").write_bytes(sample_grid_png(G_ema, ctx.num_classes, t.sample_grid_seed))
            save_weights(directory, {"G_ema": G_ema.state_dict()})
            judged["G_ema"] = G_ema
        return {"generator_spec": g_spec.to_dict()}

    for step in range(start_step, t.total_steps):
        noise = step_generator(t.seed, step, session.rank)
        index = batch_indices(step, t.global_batch_size, len(labels), t.seed, session.rank, session.world_size)
        real, y = to_unit(images[index]).to(device), labels[index].to(device)
        losses = gan_step(G, D, real, y, noise, g_spec.z_dim, t.loss, t.d_steps_per_g_step, lambda: session.autocast(amp_dtype))

        # --- EMA of G, in G's own layout (sharded under FSDP)
        strategy.update_ema(G, ema_beta(t.global_batch_size, (step + 1) * t.global_batch_size, t.ema_halflife_kimg, t.ema_rampup_ratio))

        # --- loss check, logging, checkpoint (collective)
        session.end_step(step + 1, t, losses, [G, D], build_checkpoint, sampler=lambda: GanGenerator(judged["G_ema"]))
    session.finished(t.total_steps - start_step)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def training_job(cfg: RunConfig) -> TrainingJob:
    return TrainingJob(
        stage="train_gan", family="gan", section="gan", loop=train_loop_per_worker,
        signature=resume_signature(cfg), export=_export,
    )  # fmt: skip


def run(cfg: RunConfig) -> dict:
    return train(cfg, training_job(cfg))


def _export(cfg: RunConfig, checkpoint_uri: str, context: LoopContext, mlflow) -> dict:
    """EMA generator -> <gan.out_dir> (safetensors), loss history -> DVC plots, checkpoint -> MLflow."""
    logger = log("train_gan")
    with tempfile.TemporaryDirectory() as local:
        weights, meta = fetch_checkpoint(checkpoint_uri, local)
        export_meta = {"family": "gan", "generator_spec": meta["generator_spec"], **export_provenance(meta, checkpoint_uri, context)}
        publish_export(cfg.gan, local, mlflow, lambda tmp: export_generator(tmp, weights["G_ema"], export_meta))
    logger.info("exported EMA generator at step %d -> %s", meta["step"], cfg.gan.out_dir)
    return export_meta


def main() -> None:
    run_stage("train_gan", lambda cfg, args: run(cfg) and None)


if __name__ == "__main__":
    main()
