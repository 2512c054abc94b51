"""Stage `train_ldm`: a class-conditional denoiser on the autoencoder's latents, on Ray Train.

    python -m pipelines.train_ldm [--set ldm.total_steps=100]
    python -m pipelines.train_ldm --set ldm.space=pixel --set ldm.out_dir=models/pixel   # pixel-space baseline

Same driver as the GAN (pipelines.ray_train). The latents come from encode_latents and must
match the autoencoder (channels, scale, weights), which is also part of the run's resume
signature: a new autoencoder starts a new run. With `ldm.space: pixel` the same denoiser family
trains on the images themselves.

Outputs <ldm.out_dir>/: the EMA denoiser, the autoencoder and the noise schedule in diffusers
format (gen_core.diffusion.DiffusionGenerator), generator.json, samples.png; ldm.losses_file.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DModel

from gen_core.checkpoint import save_weights
from gen_core.config import RunConfig
from gen_core.data import load_split
from gen_core.diffusion import DiffusionGenerator, build_denoiser, diffusion_loss, training_schedule
from gen_core.models import ema_beta
from gen_core.sampling import image_grid, to_uint8, to_unit
from gen_core.training import batch_indices, step_generator
from pipelines.common import absolute, log, run_stage
from pipelines.encode_latents import load_latents
from pipelines.ray_train import (
    LoopContext, TrainingJob, WorkerSession, export_provenance, fetch_checkpoint, publish_export, train,
)
from pipelines.train_autoencoder import autoencoder_digest
from pipelines.train_gan import png_bytes


def resume_signature(cfg: RunConfig, autoencoder: dict | None) -> dict:
    d = cfg.ldm
    return {
        "space": d.space, "denoiser": d.denoiser.model_dump(mode="json"), "noise": d.noise.model_dump(), "label_dropout": d.label_dropout,
        "lr": d.lr, "betas": [d.adam_beta1, d.adam_beta2], "weight_decay": d.weight_decay, "global_batch_size": d.global_batch_size,
        "ema": [d.ema_halflife_kimg, d.ema_rampup_ratio], "seed": d.seed, "resolution": cfg.data.resolution,
        "channels": cfg.data.channels, "autoencoder": autoencoder,
    }  # fmt: skip


def make_generator(cfg: RunConfig, unet, vae: AutoencoderKL | None, num_classes: int) -> DiffusionGenerator:
    image_shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    return DiffusionGenerator(unet, vae, dict(training_schedule(cfg.ldm.noise).config), num_classes, cfg.ldm.sampler, image_shape)


def sample_grid_png(model: DiffusionGenerator, seed: int, device, per_class: int = 8) -> bytes:
    """One row per class at fixed seeds, with the configured sampler and guidance."""
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    images = model.sample(labels, [seed + i for i in range(len(labels))], device)
    return png_bytes(image_grid(to_uint8(images.cpu()), rows=model.num_classes))


# ---------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)
# ---------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    session = WorkerSession(loop_config)
    cfg, ctx, device, strategy = session.cfg, session.ctx, session.device, session.strategy
    d = cfg.ldm
    amp_dtype = session.autocast_dtype(d.precision)

    # --- data: cached scaled latents (checked against the autoencoder), or the images themselves
    vae = None
    if d.space == "latent":
        data, labels, _ = load_latents(ctx.extra["latents_dir"], ctx.extra["autoencoder_dir"])
        if session.rank == 0:  # decodes the sample grids
            vae = AutoencoderKL.from_pretrained(ctx.extra["autoencoder_dir"], use_safetensors=True).to(device).eval()
    else:
        split = load_split(ctx.data_uri, "train")
        data, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels).long()

    # --- denoiser, its EMA and optimizer, wrapped by the strategy; the noise schedule
    torch.manual_seed(d.seed)
    unet = build_denoiser(d.denoiser, data.shape[1], data.shape[-1], ctx.num_classes).to(device)
    unet_config = dict(unet.config)
    make_optimizer = lambda params: torch.optim.AdamW(params, lr=d.lr, betas=(d.adam_beta1, d.adam_beta2), weight_decay=d.weight_decay)  # noqa: E731
    unet = strategy.wrap("unet", unet, make_optimizer, ema=True)
    noise_schedule = training_schedule(d.noise)
    start_step = session.restore([unet])
    unet.set_learning_rate(d.lr)  # the config's: a PBT hand-off resumes another trial's state with a new rate
    session.say(
        f"{session.where}, {strategy.describe()}, {'bf16' if amp_dtype else 'fp32'}, {d.space} space "
        f"{tuple(data.shape[1:])}, {d.noise.prediction_type} target, global batch {d.global_batch_size}, steps {start_step}->{d.total_steps}"
    )

    judged = {}  # rank 0: the EMA denoiser gathered at the last checkpoint (sample grid, sweep probe)

    def build_checkpoint(directory: Path, step: int) -> dict:
        unet_ema = strategy.gather(unet, "ema")  # collective
        if session.rank == 0:
            judged["model"] = make_generator(cfg, unet_ema, vae, ctx.num_classes)
            (directory / "samples.png").write_bytes(sample_grid_png(judged["model"], d.sample_grid_seed, device))
            save_weights(directory, {"unet_ema": unet_ema.state_dict()})
        return {"autoencoder": ctx.extra.get("autoencoder"), "unet_config": unet_config}

    for step in range(start_step, d.total_steps):
        # --- denoising step: timesteps, noise and label drops seeded per (step, rank)
        noise = step_generator(d.seed, step, session.rank)
        index = batch_indices(step, d.global_batch_size, len(labels), d.seed, session.rank, session.world_size)
        x0 = (data[index] if d.space == "latent" else to_unit(data[index])).to(device)
        with session.autocast(amp_dtype):
            loss = diffusion_loss(unet.train, noise_schedule, x0, labels[index].to(device), ctx.num_classes, d.label_dropout, noise)
            loss = loss.mean()
        unet.backward(loss)
        unet.step()

        # --- EMA, in the weights' own layout (sharded under FSDP)
        strategy.update_ema(unet, ema_beta(d.global_batch_size, (step + 1) * d.global_batch_size, d.ema_halflife_kimg, d.ema_rampup_ratio))

        # --- loss check, logging, checkpoint (collective)
        session.end_step(step + 1, d, {"loss": loss}, [unet], build_checkpoint, sampler=lambda: judged["model"])
    session.finished(d.total_steps - start_step)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def autoencoder_record(cfg: RunConfig) -> dict | None:
    """What the denoiser is tied to: the autoencoder's weights, latent channels and scale."""
    if cfg.ldm.space == "pixel":
        return None
    sha256 = autoencoder_digest(cfg.autoencoder.out_dir)  # one line if it is missing
    config = json.loads((Path(cfg.autoencoder.out_dir) / "config.json").read_text())
    return {"sha256": sha256, "latent_channels": config["latent_channels"], "scaling_factor": config["scaling_factor"]}


def training_job(cfg: RunConfig) -> TrainingJob:
    autoencoder = autoencoder_record(cfg)
    extra = {"autoencoder": autoencoder}
    if autoencoder is not None:
        extra.update(latents_dir=absolute(cfg.latents.out_dir), autoencoder_dir=absolute(cfg.autoencoder.out_dir))
        load_latents(extra["latents_dir"], extra["autoencoder_dir"])  # refuse mismatched latents before starting Ray
    job = TrainingJob(
        stage="train_ldm", family="ldm" if cfg.ldm.space == "latent" else "pixel", section="ldm", loop=train_loop_per_worker,
        signature=resume_signature(cfg, autoencoder), export=_export, extra=extra,
        logged_sections=("data", "ray", "autoencoder") if autoencoder else ("data", "ray"),
    )  # fmt: skip
    return job


def run(cfg: RunConfig) -> dict:
    return train(cfg, training_job(cfg))


def _export(cfg: RunConfig, checkpoint_uri: str, context: LoopContext, mlflow) -> dict:
    """EMA denoiser (+ autoencoder) -> <ldm.out_dir> in diffusers format, losses -> DVC plots, checkpoint -> MLflow."""
    logger = log("train_ldm")
    with tempfile.TemporaryDirectory() as local:
        weights, meta = fetch_checkpoint(checkpoint_uri, local)
        num_classes = context.num_classes
        vae = None
        if cfg.ldm.space == "latent":
            vae = AutoencoderKL.from_pretrained(context.extra["autoencoder_dir"], use_safetensors=True).eval()
        unet = UNet2DModel.from_config(meta["unet_config"])
        unet.load_state_dict(weights["unet_ema"])
        model = make_generator(cfg, unet.eval(), vae, num_classes)
        export_meta = {"autoencoder": meta.get("autoencoder"), **export_provenance(meta, checkpoint_uri, context)}
        publish_export(cfg.ldm, local, mlflow, lambda tmp: model.save_pretrained(tmp, export_meta))
    logger.info("exported EMA denoiser at step %d -> %s", meta["step"], cfg.ldm.out_dir)
    return export_meta


def main() -> None:
    run_stage("train_ldm", lambda cfg, args: run(cfg) and None)


if __name__ == "__main__":
    main()
