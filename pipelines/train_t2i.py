"""Stage `train_t2i`: text-to-image latent diffusion on the ldm family's autoencoder and cached latents, on Ray Train
(the shared driver and strategies, as train_ldm).

    python -m pipelines.train_t2i [--set t2i.total_steps=100]
    dvc repro conditional/dvc.yaml:train_t2i     # or the whole conditional pipeline: dvc repro conditional/dvc.yaml

Captions: each training image's from its class and its measured brightness and size in the frame (gen_core.captions;
the attribute scale is fitted on the train split), worded by one of four templates; an image folder with a caption
sidecar (captions.jsonl or metadata.jsonl, read by prepare) brings its own instead. The frozen all-MiniLM-L6-v2
(gen_core.text_encoder) encodes each distinct caption once per worker (a few hundred here), so a step costs what a
class-conditional step costs plus cross-attention. Text dropout sends a caption to the empty prompt, the null of
classifier-free guidance. Outputs: <outputs.t2i.out_dir>/ (gen_core.text_diffusion.TextDiffusionGenerator: unet/, vae/,
scheduler/, generator.json with the text encoder's identity and the attribute scale; samples.png: the prompt grid) and
outputs.t2i.losses_file.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import UNet2DConditionModel

from gen_core.captions import AttributeScale, captions_for
from gen_core.config import RunConfig
from gen_core.data import load_split, read_manifest
from gen_core.diffusion import training_schedule
from gen_core.latents import autoencoder_record, load_autoencoder, load_latents
from gen_core.models import ema_beta
from gen_core.text_diffusion import TextDiffusionGenerator, build_text_denoiser, prompt_grid_png, text_diffusion_loss
from gen_core.text_encoder import TextEncoder, TextEncoderError, package_dir, verify
from gen_core.training import batch_indices, step_generator
from pipelines.common import StageError, absolute, log, run_stage
from pipelines.ray_train import RunContext, RunLog, TrainingJob, export_provenance, fetch_checkpoint, publish_export, train
from pipelines.worker import start_worker


class CaptionTable:
    """The train split's captions as encoder states: one row per distinct caption, and each image's row."""

    def __init__(self, captions: list[str], encoder: TextEncoder):
        distinct = sorted(set(captions))
        row = {text: i for i, text in enumerate(distinct)}
        encoded, null = encoder.encode(distinct), encoder.encode([""])
        self.hidden, self.mask, self.null_hidden, self.null_mask = encoded.hidden, encoded.mask, null.hidden, null.mask
        self.rows = torch.tensor([row[text] for text in captions])
        self.distinct = len(distinct)

    def batch(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[index]
        return self.hidden[rows].to(device), self.mask[rows].to(device)


def training_data(data_uri: str, latents_dir: str, autoencoder_dir: str) -> tuple[torch.Tensor, list[str], AttributeScale, list[str]]:
    """The scaled latents, each train image's caption (the data's own where it has a caption sidecar, else worded from
    its class and measured attributes), the attribute scale and the class names. The latents are the train split's in
    order (encode_latents), which their labels confirm."""
    latents, labels, _ = load_latents(latents_dir, autoencoder_dir)
    split = load_split(data_uri, "train")
    if len(split.labels) != len(labels) or not torch.equal(torch.from_numpy(split.labels).long(), labels.long()):
        raise StageError(f"{latents_dir}: the latents are not of this train split (rerun encode_latents)")
    class_names = split.class_names
    scale = AttributeScale.fit(split.images)
    captions = split.captions if split.captions is not None else captions_for(split.images, split.labels, class_names, scale)
    return latents, captions, scale, class_names


def train_loop_per_worker(worker_config: dict) -> None:
    worker, report, store = start_worker(worker_config)
    cfg, ctx, device, strategy = worker.cfg, worker.ctx, worker.device, worker.strategy
    t = cfg.t2i
    amp_dtype = worker.autocast_dtype(t.precision)

    latents, captions, scale, class_names = training_data(ctx.data_uri, ctx.extra["latents_dir"], ctx.extra["autoencoder_dir"])
    encoder = TextEncoder()
    table = CaptionTable(captions, encoder)
    vae = load_autoencoder(ctx.extra["autoencoder_dir"]).to(device) if worker.is_chief else None  # decodes the prompt grids

    # --- denoiser, its EMA and optimizer, wrapped by the strategy; the noise schedule
    torch.manual_seed(t.seed)
    d = t.denoiser
    unet = build_text_denoiser(latents.shape[1], latents.shape[-1], encoder.dim, d.block_out_channels, d.layers_per_block, d.attention_head_dim)
    unet_config = dict(unet.to(device).config)
    parameters = sum(p.numel() for p in unet.parameters())
    make_optimizer = lambda params: torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=0.0)  # noqa: E731
    unet = strategy.wrap("unet", unet, make_optimizer, ema=True)
    noise_schedule = training_schedule(t.noise)
    start_step = store.restore([unet])
    report.say(
        f"{worker.where}, {strategy.describe()}, {'bf16' if amp_dtype else 'fp32'}, latents {tuple(latents.shape[1:])}, "
        f"UNet2DConditionModel of {parameters:,} parameters, {len(captions)} captions ({table.distinct} distinct), "
        f"text dropout {t.text_dropout:g}, global batch {t.global_batch_size}, steps {start_step}->{t.total_steps}"
    )

    for step in range(start_step, t.total_steps):
        # --- denoising step: timesteps, noise and caption drops seeded per (step, rank)
        noise = step_generator(t.seed, step, worker.rank)
        index = batch_indices(step, t.global_batch_size, len(captions), t.seed, worker.rank, worker.world_size)
        hidden, mask = table.batch(index, device)
        with worker.training_compute(amp_dtype):
            loss = text_diffusion_loss(unet.forward, noise_schedule, latents[index].to(device), hidden, mask, table.null_hidden,
                                       table.null_mask, t.text_dropout, noise, t.min_snr_gamma).mean()  # fmt: skip
        unet.backward(loss)
        unet.step()
        strategy.update_ema(unet, ema_beta(t.global_batch_size, (step + 1) * t.global_batch_size, t.ema_halflife_kimg, t.ema_rampup_ratio))
        values = report.step_done(step + 1, {"loss": loss})

        if store.due(step + 1):
            with store.writing(step + 1, [unet], values) as checkpoint:
                unet_ema = strategy.gather(unet, "ema")  # collective; a plain module on rank 0, None elsewhere
                if unet_ema is not None:
                    model = generator(cfg, unet_ema, vae, encoder, scale, class_names)
                    checkpoint.add_sample_grid(prompt_grid_png(model, t.sample_grid_seed, device))
                    checkpoint.add_weights({"unet_ema": unet_ema.state_dict()})
                checkpoint.meta.update(autoencoder=ctx.extra["autoencoder"], unet_config=unet_config, attribute_scale=scale.to_json())
    report.finished(t.total_steps - start_step)


def generator(cfg: RunConfig, unet, vae, encoder: TextEncoder, scale: AttributeScale, class_names: list[str]) -> TextDiffusionGenerator:
    image_shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    return TextDiffusionGenerator(unet, vae, dict(training_schedule(cfg.t2i.noise).config), cfg.t2i.sampler, image_shape, encoder, scale, class_names)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def training_job(cfg: RunConfig) -> TrainingJob:
    """As train_ldm's: the denoiser is tied to the autoencoder, one of the job's inputs; mismatched latents are refused before Ray starts."""
    autoencoder = autoencoder_record(cfg.outputs.autoencoder.out_dir)
    extra = {"autoencoder": autoencoder, "latents_dir": absolute(cfg.latents.out_dir), "autoencoder_dir": absolute(cfg.outputs.autoencoder.out_dir)}
    load_latents(extra["latents_dir"], extra["autoencoder_dir"])
    try:  # before Ray starts; every worker checks them again as it loads the encoder
        verify(package_dir())
    except TextEncoderError as err:
        raise StageError(str(err)) from None
    return TrainingJob(stage="train_t2i", kind="t2i", section="t2i", worker_loop=train_loop_per_worker, export=export,
                       inputs={"autoencoder": autoencoder}, extra=extra, logged_sections=("data", "ray", "autoencoder"))  # fmt: skip


def export(cfg: RunConfig, checkpoint_uri: str, context: RunContext, run_log: RunLog) -> dict:
    """EMA denoiser + autoencoder + schedule -> <outputs.t2i.out_dir> in diffusers format, losses -> DVC plots, checkpoint -> MLflow."""
    with tempfile.TemporaryDirectory() as local:
        weights, meta = fetch_checkpoint(checkpoint_uri, local)
        unet = UNet2DConditionModel.from_config(meta["unet_config"])
        unet.load_state_dict(weights["unet_ema"])
        model = generator(cfg, unet.eval(), load_autoencoder(context.extra["autoencoder_dir"]), TextEncoder(),
                          AttributeScale.from_json(meta["attribute_scale"]), read_manifest(context.data_uri)["class_names"])  # fmt: skip
        export_meta = {"autoencoder": meta.get("autoencoder"), **export_provenance(meta, checkpoint_uri, context)}
        publish_export(cfg.outputs.t2i, local, run_log, lambda tmp: model.save_pretrained(tmp, export_meta))
    log("train_t2i").info("exported EMA text denoiser at step %d -> %s", meta["step"], cfg.outputs.t2i.out_dir)
    return export_meta


def main() -> None:
    run_stage("train_t2i", lambda cfg, args: train(cfg, training_job(cfg)) and None)


if __name__ == "__main__":
    main()
