"""Stage `train_autoencoder`: the KL autoencoder of the latent-diffusion family, on Ray Train.

    python -m pipelines.train_autoencoder [--set autoencoder.total_steps=100]

Same driver as the GAN (pipelines.ray_train): ray.strategy workers, resume from storage, MLflow run.
Outputs:
  <outputs.autoencoder.out_dir>/  AutoencoderKL in diffusers format; its config's `scaling_factor` is
                                  1 / std of the train split's latents, measured after training (or, with
                                  autoencoder.latent_normalisation per_channel, 1 beside each channel's
                                  `latents_mean` and `latents_std`);
                                  autoencoder.json: provenance + metrics; samples.png: eval images over
                                  their reconstructions
  outputs.autoencoder.metrics_file  reconstruction PSNR (dB) and FID of the eval split (DVC metrics)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from gen_core.checkpoint import CheckpointError
from gen_core.classifier import FeatureDistance, load_classifier
from gen_core.config import RunConfig
from gen_core.data import load_split
from gen_core.diffusion import AutoencoderRoundTrip, PatchDiscriminator, adaptive_weight, autoencoder_loss, build_autoencoder, patch_hinge_loss, psnr
from gen_core.io import atomic_write_json
from gen_core.latents import latent_normalisation, reconstruct, reconstruction_grid_png
from gen_core.lpips import LpipsWeightsError, load_lpips
from gen_core.metrics import fid_from_stats, inception_stats, load_inception, load_inception_reference
from gen_core.sampling import to_uint8, to_unit
from gen_core.training import batch_indices, step_generator
from pipelines.common import StageError, absolute, inception_progress, log, run_stage
from pipelines.ray_train import RunContext, RunLog, TrainingJob, export_provenance, fetch_checkpoint, publish_export, train
from pipelines.strategy import compile_in_place
from pipelines.worker import start_worker

GRID_IMAGES = 32  # fixed eval images shown over their reconstructions


# ---------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)
# ---------------------------------------------------------------------------


def train_loop_per_worker(worker_config: dict) -> None:
    worker, report, store = start_worker(worker_config)
    cfg, ctx, device, strategy = worker.cfg, worker.ctx, worker.device, worker.strategy
    a = cfg.autoencoder
    amp_dtype = worker.autocast_dtype(a.precision)

    # --- data
    images = torch.from_numpy(load_split(ctx.data_uri, "train").images)
    grid_images = torch.from_numpy(load_split(ctx.data_uri, "eval").images[:GRID_IMAGES])

    # --- model and optimizer, wrapped by the strategy (the round trip is one forward: encode, sample, decode)
    torch.manual_seed(a.seed)
    vae = build_autoencoder(a, cfg.data.channels).to(device)
    model = strategy.wrap("vae", AutoencoderRoundTrip(vae), lambda params: torch.optim.Adam(params, lr=a.lr), compile=worker.compile)
    perceptual = perceptual_distance(a, ctx, device, worker.compile)  # frozen, beside the wrapped model
    adv = a.adversarial
    disc = discriminator(strategy, cfg) if adv.weight else None  # the PatchGAN's D: a part of its own, checkpointed too
    parts = [model, disc] if disc else [model]
    start_step = store.restore(parts)
    model.set_learning_rate(a.lr)
    zero = torch.zeros((), device=device)
    report.say(
        f"{worker.where}, {strategy.describe()}, {'bf16' if amp_dtype else 'fp32'}{worker.compile_note}, "
        f"f={a.downsample_factor} latents {a.latent_channels}x{cfg.data.resolution // a.downsample_factor}^2, "
        f"global batch {a.global_batch_size}, steps {start_step}->{a.total_steps}"
    )

    for step in range(start_step, a.total_steps):
        # --- reconstruction + KL step
        noise = step_generator(a.seed, step, worker.rank)
        index = batch_indices(step, a.global_batch_size, len(images), a.seed, worker.rank, worker.world_size)
        x = to_unit(images[index]).to(device)
        adversarial = adv.weight and step >= adv.start_step
        with worker.training_compute(amp_dtype):
            loss, reconstruction = autoencoder_loss(model.forward, x, a.reconstruction_loss, a.kl_weight, noise, perceptual,
                                                    a.perceptual_weight, a.perceptual_images)  # fmt: skip
            logged = {"loss": loss.mean(), **({"g_adv": zero, "adv_scale": zero, "d_loss": zero} if adv.weight else {})}  # same columns every step
            loss = logged["loss"] + (adversarial_term(model, disc, reconstruction, logged, adv.weight) if adversarial else 0.0)
        model.backward(loss)
        model.step()
        if adversarial:  # D step: images vs the reconstructions just made
            with worker.training_compute(amp_dtype):
                logged["d_loss"] = patch_hinge_loss(disc.forward(x), disc.forward(reconstruction.detach()))
            disc.backward(logged["d_loss"])
            disc.step()

        # --- log (every rank joins the loss reduce)
        values = report.step_done(step + 1, logged)

        # --- checkpoint, with eval images over their reconstructions (collective)
        if store.due(step + 1):
            with store.writing(step + 1, parts, values) as checkpoint:
                whole = strategy.gather(model, "model")  # collective; a plain module on rank 0, None elsewhere
                if whole is not None:
                    whole.eval()
                    checkpoint.add_sample_grid(reconstruction_grid_png(whole.vae, grid_images))
                    checkpoint.add_weights({"vae": whole.vae.state_dict()})
                    whole.train(whole is model.module)  # the live model goes back to training
                checkpoint.meta["autoencoder"] = a.model_dump(mode="json")
    report.finished(a.total_steps - start_step)


def perceptual_distance(a, ctx, device, compile: bool) -> torch.nn.Module | None:
    """The perceptual term's network: LPIPS-VGG16, or the pipeline's classifier (FeatureDistance); None when off.
    compile: through torch.compile, as the round trip (the PatchGAN's D, when on, stays eager)."""
    if not a.perceptual_weight:
        return None
    network = load_lpips(device) if a.perceptual == "lpips" else FeatureDistance(load_classifier(ctx.extra["classifier_dir"])[0]).to(device)
    if compile:
        compile_in_place(network)
    return network


def discriminator(strategy, cfg: RunConfig):
    adv = cfg.autoencoder.adversarial
    return strategy.wrap("disc", PatchDiscriminator(cfg.data.channels, adv.d_width, adv.d_layers),
                         lambda params: torch.optim.Adam(params, lr=adv.lr_d, betas=(0.5, 0.9)))  # fmt: skip


def adversarial_term(model, disc, reconstruction, logged: dict, weight: float):
    """The PatchGAN generator term, -mean D(reconstruction), times `weight` x the adaptive weight at the decoder's
    last layer (it also goes into `logged`). D is frozen and called as its plain module: only the autoencoder's
    gradients are reduced."""
    with disc.frozen() as frozen_disc:
        g_loss = -frozen_disc(reconstruction).float().mean()
    scale = weight * adaptive_weight(logged["loss"], g_loss, model.module.vae.decoder.conv_out.weight)
    logged.update(g_adv=g_loss, adv_scale=scale)
    return scale * g_loss


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def training_job(cfg: RunConfig) -> TrainingJob:
    if cfg.autoencoder.adversarial.weight and cfg.ray.strategy != "ddp":
        raise StageError(f"autoencoder.adversarial: needs ray.strategy ddp, not {cfg.ray.strategy} (its adaptive weight "
                         "takes gradients at the decoder's last layer, which fsdp and deepspeed shard)")  # fmt: skip
    extra = {}
    if cfg.autoencoder.perceptual_weight and cfg.autoencoder.perceptual == "lpips":
        try:
            load_lpips()  # before Ray starts: the weights are there and unaltered (converted and cached on first use)
        except LpipsWeightsError as err:
            raise StageError(f"autoencoder.perceptual_weight: {err}") from None
    elif cfg.autoencoder.perceptual_weight:
        extra["classifier_dir"] = absolute(cfg.classifier.out_dir)  # workers run elsewhere
        try:
            load_classifier(extra["classifier_dir"])
        except CheckpointError as err:
            raise StageError(f"autoencoder.perceptual: {err}") from None
    return TrainingJob(stage="train_autoencoder", kind="autoencoder", section="autoencoder", worker_loop=train_loop_per_worker,
                       export=export, extra=extra)  # fmt: skip


def export(cfg: RunConfig, checkpoint_uri: str, context: RunContext, run_log: RunLog) -> dict:
    """Measure the latent scale and the reconstruction metrics, then write the diffusers-format model."""
    logger, a, outputs = log("train_autoencoder"), cfg.autoencoder, cfg.outputs.autoencoder
    with tempfile.TemporaryDirectory() as local:
        weights, meta = fetch_checkpoint(checkpoint_uri, local)
        vae = build_autoencoder(a, cfg.data.channels)
        vae.load_state_dict(weights["vae"])
        vae.eval()
        train_images = torch.from_numpy(load_split(context.data_uri, "train").images[:10_000])
        normalisation = latent_normalisation(vae, train_images, per_channel=a.latent_normalisation == "per_channel")
        vae.register_to_config(**normalisation)
        scaling_factor = normalisation["scaling_factor"]

        evals = torch.from_numpy(load_split(context.data_uri, "eval").images)
        reconstruction = reconstruct(vae, evals)
        metrics = {"psnr_db": float(psnr(to_unit(evals), reconstruction).mean()), "scaling_factor": scaling_factor, "step": meta["step"]}
        metrics.update(reconstruction_fid(cfg, to_uint8(reconstruction[: a.rfid_images]), logger))
        logger.info("reconstruction psnr %.2f dB, fid %.2f, latent scale %.4f", metrics["psnr_db"], metrics["fid"], scaling_factor)

        export_meta = {"family": "autoencoder", "metrics": metrics, **export_provenance(meta, checkpoint_uri, context)}

        def write(tmp: Path) -> None:
            vae.save_pretrained(tmp, safe_serialization=True)
            atomic_write_json(tmp / "autoencoder.json", export_meta)

        publish_export(outputs, local, run_log, write)
        atomic_write_json(outputs.metrics_file, metrics)
        run_log.log_metrics({f"recon_{k}": float(v) for k, v in metrics.items() if k != "step"}, step=meta["step"])
    logger.info("exported autoencoder at step %d -> %s", meta["step"], outputs.out_dir)
    return export_meta


def reconstruction_fid(cfg: RunConfig, reconstruction_uint8: torch.Tensor, logger) -> dict:
    """Inception FID of (the first autoencoder.rfid_images of) the eval split's reconstructions against the
    evaluation protocol's reference set (ref_stats). Fewer images bias it upwards: compare it only at the same setting."""
    reference, _ = load_inception_reference(cfg.reference_dir, cfg.ref_stats.inception)
    net = load_inception(cfg.ref_stats.inception, precision=cfg.evaluate.active.inception_precision)
    stats, _ = inception_stats(net, reconstruction_uint8, cfg.ref_stats.inception.batch_size, inception_progress(logger))
    return {"fid": fid_from_stats(stats.mu, stats.sigma, reference["mu"], reference["sigma"]), "fid_images": len(reconstruction_uint8)}


def main() -> None:
    run_stage("train_autoencoder", lambda cfg, args: train(cfg, training_job(cfg)) and None)


if __name__ == "__main__":
    main()
