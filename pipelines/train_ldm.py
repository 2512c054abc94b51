"""Stage `train_ldm`: a class-conditional denoiser on the autoencoder's latents, on Ray Train.

    python -m pipelines.train_ldm [--set ldm.total_steps=100]
    python -m pipelines.train_ldm --set ldm.space=pixel --set outputs.ldm.out_dir=models/pixel   # pixel-space baseline

Same driver as the GAN (pipelines.ray_train). The latents come from encode_latents and must
match the autoencoder (channels, scale, weights), which is also part of the run's resume
signature: a new autoencoder starts a new run. With `ldm.space: pixel` the same denoiser family
trains on the images themselves.

With `ldm.sampler.guidance: autoguidance` (or guide_null, guide_blend) samples are guided by `ldm.guide_dir`, another export of
this stage trained smaller and shorter on the same latents; it is checked before training starts, guides the
in-training evaluations and is copied into the export.

Outputs <outputs.ldm.out_dir>/: the EMA denoiser, the autoencoder and the noise schedule in diffusers
format (gen_core.diffusion.DiffusionGenerator), generator.json, samples.png; outputs.ldm.losses_file.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from gen_core.alignment import AlignedDenoiser, ClassifierTarget
from gen_core.classifier import load_classifier
from gen_core.config import RunConfig
from gen_core.data import load_split, read_manifest
from gen_core.diffusion import build_denoiser, denoiser_class, diffusion_generator, diffusion_loss, edm_loss, load_guide, training_schedule
from gen_core.errors import LatentMismatchError
from gen_core.latents import autoencoder_record, load_autoencoder, load_latents
from gen_core.models import ema_beta
from gen_core.sampling import class_grid_png, to_unit
from gen_core.training import batch_indices, cooldown, step_generator
from pipelines.common import absolute, log, run_stage
from pipelines.probe import checkpoint_evaluator
from pipelines.ray_train import RunContext, RunLog, TrainingJob, export_provenance, fetch_checkpoint, publish_export, train
from pipelines.worker import start_worker


# ---------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)
# ---------------------------------------------------------------------------


def training_data(worker, d) -> tuple[torch.Tensor, torch.Tensor, AutoencoderKL | None, tuple | None]:
    """Cached scaled latents (checked against the autoencoder) and, on rank 0, the autoencoder that decodes
    the sample grids and the guide of sampler.guidance (evaluation sends the whole model to the other ranks);
    or, in pixel space, the images."""
    ctx = worker.ctx
    if d.space == "pixel":
        split = load_split(ctx.data_uri, "train")
        data, labels, vae = torch.from_numpy(split.images), torch.from_numpy(split.labels).long(), None
    else:
        data, labels, _ = load_latents(ctx.extra["latents_dir"], ctx.extra["autoencoder_dir"])
        vae = load_autoencoder(ctx.extra["autoencoder_dir"]).to(worker.device) if worker.is_chief else None
    guide = guide_for(d, ctx.extra, ctx.num_classes, data.shape[1:], worker.device) if worker.is_chief else None
    return data, labels, vae, guide


class AlignmentTarget:
    """REPA's target (ldm.alignment): the classifier stage's features of the training images behind a batch's latents
    (encode_latents keeps the train split's order), computed per batch on the worker's device."""

    def __init__(self, encoder: ClassifierTarget, images: torch.Tensor, device):
        self.encoder, self.images, self.device = encoder.to(device), images, device

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        return self.encoder(to_unit(self.images[index]).to(self.device))


def alignment_target(worker, d, data: torch.Tensor) -> AlignmentTarget | None:
    """ldm.alignment on: the classifier and the train split's images, which must be the ones the latents encode
    (in pixel space, `data` itself)."""
    if not d.alignment.weight:
        return None
    classifier, _ = load_classifier(worker.ctx.extra["classifier_dir"])
    images = data if d.space == "pixel" else torch.from_numpy(load_split(worker.ctx.data_uri, "train").images)
    if len(images) != len(data):
        raise LatentMismatchError(f"{worker.ctx.extra['latents_dir']}: {len(data)} latents for {len(images)} training images; rerun encode_latents")
    return AlignmentTarget(ClassifierTarget(classifier), images, worker.device)


def edm_sigma_data(d, data: torch.Tensor) -> float | None:
    """The data's std for an EDM network (`ldm.edm.sigma_data`, or measured on the whole training set, so the same on
    every rank); None for an epsilon or v network."""
    if d.noise.prediction_type != "edm":
        return None
    return d.edm.sigma_data or float((data.float() if d.space == "latent" else to_unit(data)).std())


def guide_for(d, extra: dict, num_classes: int, shape, device="cpu") -> tuple | None:
    """sampler.guidance autoguidance / guide_null / guide_blend: ldm.guide_dir's denoiser, checked against this run (load_guide), on
    `device` -> (network, its EDM sigma_data); None for classifier-free guidance."""
    if d.sampler.guidance == "cfg":
        return None
    autoencoder = extra.get("autoencoder")
    network, sigma_data = load_guide(extra["guide_dir"], dict(training_schedule(d.noise).config), tuple(shape), num_classes, d.space,
                                     autoencoder and autoencoder["sha256"])  # fmt: skip
    return network.to(device), sigma_data


def target_description(d, sigma_data: float | None) -> str:
    if sigma_data is not None:
        return f"EDM (sigma_data {sigma_data:.3g}, ln sigma ~ N({d.edm.p_mean:g}, {d.edm.p_std:g}^2))"
    return f"{d.noise.prediction_type} target{f' (min-SNR-{d.min_snr_gamma:g} weighted)' if d.min_snr_gamma else ''}"


def rate_description(d) -> str:
    return f"lr {d.lr:g}" + (f" (cosine cooldown over the last {d.lr_cooldown:.0%} of the steps)" if d.lr_cooldown else "")


def denoiser_part(worker, d, data: torch.Tensor) -> tuple:
    """The denoiser (inside an AlignedDenoiser under ldm.alignment), seeded, wrapped by the strategy with its EMA and
    optimizer -> (part, the denoiser's config, its description, REPA's target or None)."""
    torch.manual_seed(d.seed)
    unet = build_denoiser(d.denoiser, data.shape[1], data.shape[-1], worker.ctx.num_classes).to(worker.device)
    unet_config = {**dict(unet.config), "_class_name": type(unet).__name__}  # the config alone does not name its class
    backbone = f"{d.denoiser.backbone} of {sum(p.numel() for p in unet.parameters()):,} parameters"
    target = alignment_target(worker, d, data)
    if target is not None:
        unet = AlignedDenoiser(unet, target.encoder.channels, d.alignment.projector_width).to(worker.device)
        backbone += f", aligned to the classifier's features (weight {d.alignment.weight:g}; REPA)"
    make_optimizer = lambda params: torch.optim.AdamW(params, lr=d.lr, betas=(d.adam_beta1, d.adam_beta2), weight_decay=d.weight_decay)  # noqa: E731
    return worker.strategy.wrap("unet", unet, make_optimizer, ema=True, compile=worker.compile), unet_config, backbone, target


def train_loop_per_worker(worker_config: dict) -> None:
    worker, report, store = start_worker(worker_config)
    cfg, ctx, device, strategy = worker.cfg, worker.ctx, worker.device, worker.strategy
    d = cfg.ldm
    amp_dtype = worker.autocast_dtype(d.precision)

    data, labels, vae, guide = training_data(worker, d)
    sigma_data = edm_sigma_data(d, data)

    # --- denoiser (with REPA's projector), its EMA and optimizer, wrapped by the strategy; the noise schedule
    unet, unet_config, backbone, target = denoiser_part(worker, d, data)
    noise_schedule = training_schedule(d.noise)
    start_step = store.restore([unet])
    evaluate = checkpoint_evaluator(worker, report, store)
    report.say(
        f"{worker.where}, {strategy.describe()}, {'bf16' if amp_dtype else 'fp32'}{worker.compile_note}, {d.space} space {tuple(data.shape[1:])}, {backbone}, "
        f"{target_description(d, sigma_data)}, global batch {d.global_batch_size}, {rate_description(d)}, steps {start_step}->{d.total_steps}"
    )

    for step in range(start_step, d.total_steps):
        # --- denoising step: timesteps, noise and label drops seeded per (step, rank)
        noise = step_generator(d.seed, step, worker.rank)
        index = batch_indices(step, d.global_batch_size, len(labels), d.seed, worker.rank, worker.world_size)
        x0 = (data[index] if d.space == "latent" else to_unit(data[index])).to(device)
        unet.set_learning_rate(d.lr * cooldown(step, d.total_steps, d.lr_cooldown))  # the config's (not a PBT hand-off's), on its cooldown
        features = target(index) if target is not None else None
        with worker.training_compute(amp_dtype):
            if sigma_data is None:
                loss = diffusion_loss(unet.forward, noise_schedule, x0, labels[index].to(device), ctx.num_classes, d.label_dropout, noise,
                                      d.min_snr_gamma, features)  # fmt: skip
            else:
                loss = edm_loss(unet.forward, x0, labels[index].to(device), ctx.num_classes, d.label_dropout, noise, d.edm, sigma_data, features)
            losses = {"loss": loss.mean()} if features is None else {"loss": loss[0].mean(), "alignment": loss[1].mean()}
            total = losses["loss"] + d.alignment.weight * losses.get("alignment", 0.0)
        unet.backward(total)
        unet.step()

        # --- EMA, in the weights' own layout (sharded under FSDP)
        strategy.update_ema(unet, ema_beta(d.global_batch_size, (step + 1) * d.global_batch_size, d.ema_halflife_kimg, d.ema_rampup_ratio))

        # --- log (every rank joins the loss reduce)
        values = report.step_done(step + 1, losses)

        # --- checkpoint, with the EMA denoiser's sample grid and evaluation (collective)
        if store.due(step + 1):
            with store.writing(step + 1, [unet], values) as checkpoint:
                unet_ema = strategy.gather(unet, "ema")  # collective; a plain module on rank 0, None elsewhere
                if isinstance(unet_ema, AlignedDenoiser):
                    unet_ema = unet_ema.denoiser  # the projector is for training only
                model = diffusion_generator(d, cfg.data, unet_ema, vae, ctx.num_classes, sigma_data, guide) if unet_ema is not None else None
                if model is not None:
                    checkpoint.add_sample_grid(class_grid_png(model, d.sample_grid_seed, device))
                    checkpoint.add_weights({"unet_ema": unet_ema.state_dict()})
                if evaluate and evaluate.due(step + 1):
                    checkpoint.add_evaluation(evaluate(step + 1, model, amp_dtype))  # collective: samples on every rank
                checkpoint.meta.update(autoencoder=ctx.extra.get("autoencoder"), unet_config=unet_config, edm_sigma_data=sigma_data)
        if evaluate and evaluate.stop:  # `patience` evaluations without improvement
            break
    report.finished((step + 1 if evaluate and evaluate.stop else d.total_steps) - start_step)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def training_job(cfg: RunConfig) -> TrainingJob:
    """The denoiser is tied to the autoencoder (weights, channels, scale): it is one of the job's inputs."""
    autoencoder = autoencoder_record(cfg.outputs.autoencoder.out_dir) if cfg.ldm.space == "latent" else None
    extra = {"autoencoder": autoencoder}
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    if autoencoder is not None:
        extra.update(latents_dir=absolute(cfg.latents.out_dir), autoencoder_dir=absolute(cfg.outputs.autoencoder.out_dir))
        shape = load_latents(extra["latents_dir"], extra["autoencoder_dir"])[0].shape[1:]  # refuse mismatched latents before starting Ray
    if cfg.ldm.alignment.weight:  # REPA's encoder: the classifier stage's model
        extra["classifier_dir"] = absolute(cfg.classifier.out_dir)
        load_classifier(extra["classifier_dir"])  # missing: one line before starting Ray
    if cfg.ldm.sampler.guidance != "cfg":  # and a guide that does not fit
        extra["guide_dir"] = absolute(cfg.ldm.guide_dir)
        guide_for(cfg.ldm, extra, len(read_manifest(absolute(cfg.data.out_dir))["class_names"]), shape)
    return TrainingJob(
        stage="train_ldm", kind="ldm" if cfg.ldm.space == "latent" else "pixel", section="ldm", worker_loop=train_loop_per_worker,
        export=export, inputs={"autoencoder": autoencoder}, extra=extra,
        logged_sections=("data", "ray", "autoencoder") if autoencoder else ("data", "ray"),
    )  # fmt: skip


def export(cfg: RunConfig, checkpoint_uri: str, context: RunContext, run_log: RunLog) -> dict:
    """EMA denoiser (+ autoencoder) -> <outputs.ldm.out_dir> in diffusers format, losses -> DVC plots, checkpoint -> MLflow."""
    with tempfile.TemporaryDirectory() as local:
        weights, meta = fetch_checkpoint(checkpoint_uri, local)
        vae = None
        if cfg.ldm.space == "latent":
            vae = load_autoencoder(context.extra["autoencoder_dir"])
        unet = denoiser_class(meta["unet_config"]).from_config(meta["unet_config"])
        unet.load_state_dict(weights["unet_ema"])
        guide = guide_for(cfg.ldm, context.extra, context.num_classes, (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size))
        model = diffusion_generator(cfg.ldm, cfg.data, unet.eval(), vae, context.num_classes, meta.get("edm_sigma_data"), guide)
        export_meta = {"autoencoder": meta.get("autoencoder"), **export_provenance(meta, checkpoint_uri, context),
                       **({"guide": guide_provenance(cfg.ldm.guide_dir)} if guide else {})}  # fmt: skip
        publish_export(cfg.outputs.ldm, local, run_log, lambda tmp: model.save_pretrained(tmp, export_meta))
    log("train_ldm").info("exported EMA denoiser at step %d -> %s", meta["step"], cfg.outputs.ldm.out_dir)
    return export_meta


def guide_provenance(directory: str) -> dict:
    """Where the exported guide came from: its export's step, checkpoint and training run."""
    meta = json.loads((Path(directory) / "generator.json").read_text())  # load_guide has read it
    return {"dir": directory, **{key: meta.get(key) for key in ("step", "checkpoint", "mlflow_run_id", "git_revision")}}


def main() -> None:
    run_stage("train_ldm", lambda cfg, args: train(cfg, training_job(cfg)) and None)


if __name__ == "__main__":
    main()
