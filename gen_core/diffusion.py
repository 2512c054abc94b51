"""Latent diffusion building blocks on Hugging Face diffusers: autoencoder, denoiser, noise
schedules, losses and seeded samplers.

Networks are diffusers models (AutoencoderKL; UNet2DModel or gen_core.dit's GenforgeDiT); schedules are diffusers
schedulers built from the config; this module adds the pieces a class-conditional latent model
needs around them:

- `AutoencoderRoundTrip`: encode -> sample posterior -> decode as one forward, so DDP sees it.
- `autoencoder_loss` / `diffusion_loss` / `edm_loss`: per-sample losses, the training step reduces them; the autoencoder's
  optional PatchGAN term: `PatchDiscriminator`, `patch_hinge_loss`, `adaptive_weight`.
- `sample_diffusion`: DDPM / DDIM / DPM-Solver++ / Heun with classifier-free guidance or autoguidance, one seeded
  torch.Generator per sample, so sample i is the same image whatever the batch or worker.
- `DiffusionGenerator`: an exported model (diffusers format on disk) that samples images.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from torch import nn

from gen_core.errors import LatentMismatchError
from gen_core.config import AutoencoderConfig, DenoiserConfig, EdmConfig, NoiseScheduleConfig, SamplerConfig
from gen_core import diffusers_pipeline, dit
from gen_core.diffusers_pipeline import (EDM_TIMESTEP_SCALE, FORWARD_PROCESS, EDMDenoiser, GenforgeLatentDiffusionPipeline, denoise,
                                        edm_preconditioning, from_denoiser_latents, make_sampler)  # fmt: skip
from gen_core.dit import GenforgeDiT
from gen_core.latents import PRETRAINED
from gen_core.sampling import check_labels


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


def build_autoencoder(cfg: AutoencoderConfig, channels: int, scaling_factor: float = 1.0) -> AutoencoderKL:
    """AutoencoderKL with log2(f) downsamples: (N, C, R, R) <-> latents (N, latent_channels, R/f, R/f)."""
    levels = int(math.log2(cfg.downsample_factor)) + 1  # the last block does not downsample
    widths = tuple(cfg.width * 2**i for i in range(levels))
    return AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths, layers_per_block=cfg.layers_per_block, norm_num_groups=min(cfg.width, 32),
        scaling_factor=scaling_factor,
    )  # fmt: skip


class AutoencoderRoundTrip(nn.Module):
    """encode -> posterior sample -> decode in one forward (DDP only syncs what runs in forward)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """images (N, C, R, R) in [-1, 1] -> (reconstruction, posterior mean, posterior logvar)."""
        posterior = self.vae.encode(images).latent_dist
        return self.vae.decode(posterior.sample(generator)).sample, posterior.mean, posterior.logvar


def build_denoiser(cfg: DenoiserConfig, channels: int, sample_size: int, num_classes: int) -> UNet2DModel | GenforgeDiT:
    """Class-conditional UNet2DModel or DiT (cfg.backbone). Label `num_classes` is the "null" class used by guidance."""
    if cfg.backbone == "dit":
        sizes = cfg.dit.model_dump(exclude={"preset"})
        return GenforgeDiT(sample_size=sample_size, in_channels=channels, num_class_embeds=num_classes + 1, **sizes)
    levels = len(cfg.block_out_channels)
    attention = [i >= levels - cfg.attention_levels for i in range(levels)]
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        num_class_embeds=num_classes + 1, attention_head_dim=cfg.attention_head_dim, norm_num_groups=32,
    )  # fmt: skip


DENOISER_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, GenforgeDiT)}


def denoiser_class(config) -> type[UNet2DModel] | type[GenforgeDiT]:
    """The network class a saved denoiser config names (its `_class_name`); only these two load."""
    name = dict(config).get("_class_name", "UNet2DModel")
    if name not in DENOISER_CLASSES:
        raise LatentMismatchError(f"denoiser class {name!r} is not one genforge trains ({', '.join(DENOISER_CLASSES)})")
    return DENOISER_CLASSES[name]


# ---------------------------------------------------------------------------
# Noise schedules and samplers
# ---------------------------------------------------------------------------

def training_schedule(cfg: NoiseScheduleConfig) -> DDPMScheduler:
    """The forward process; an EDM network samples on it through EDMDenoiser, as an epsilon network."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon" if cfg.prediction_type == "edm" else cfg.prediction_type,
        clip_sample=False,  # latents are not bounded to [-1, 1]; pixel models clamp at the end
    )  # fmt: skip


def per_sample_generators(seeds, device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_diffusion(
    unet: nn.Module, schedule_config, labels: torch.Tensor, seeds, shape: tuple[int, ...], num_classes: int,
    sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 1.0, device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None, guidance_interval: tuple[float, float] | None = None, guide: nn.Module | None = None,
    guidance: str = "cfg", guide_blend: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Run the reverse process from seeded noise. Returns x_0 of shape (N, *shape), unclipped.

    labels: (N,) class ids in [0, num_classes). Guidance pushes the conditional prediction away from a
    reference: out = ref + guidance_scale * (cond - ref), at every step or at the steps whose noise level
    sigma_t lies in guidance_interval = (lo, hi]; ref is the "null" class prediction (guidance cfg) or
    the `guide` network's (autoguidance, guide_null, guide_blend: gen_core.diffusers_pipeline.denoise).
    """
    generators = per_sample_generators(seeds, "cpu")
    return denoise(unet, schedule_config, check_labels(labels, num_classes), generators, shape, num_classes, sampler, num_steps,
                   guidance_scale, device, autocast_dtype, guidance_interval, guide, guidance, guide_blend)  # fmt: skip


# ---------------------------------------------------------------------------
# Losses (per sample; the training step reduces)
# ---------------------------------------------------------------------------


def autoencoder_loss(
    round_trip: nn.Module, images: torch.Tensor, kind: str, kl_weight: float, generator=None,
    perceptual: nn.Module | None = None, perceptual_weight: float = 0.0, perceptual_images: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """-> (loss (N,), reconstruction (N, C, R, R)): the pixel error, plus `perceptual_weight` x the perceptual
    distance (gen_core.lpips) when one is given, plus KL of the diagonal Gaussian posterior vs N(0, I).
    With `perceptual_images` k, only the first k images get the perceptual term, scaled by N/k: the batch's
    mean loss is then an unbiased estimate of the full term's (the batch is a random draw) at k/N of its cost."""
    reconstruction, mean, logvar = round_trip(images, generator)
    error = (reconstruction.float() - images).abs() if kind == "l1" else (reconstruction.float() - images).pow(2)
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1)
    loss = error.flatten(1).mean(1) + kl_weight * kl
    if perceptual is not None and perceptual_weight > 0:
        k = min(perceptual_images or len(images), len(images))
        distance = perceptual(reconstruction[:k], images[:k]).float() * (len(images) / k)
        loss = loss + perceptual_weight * nn.functional.pad(distance, (0, len(images) - k))
    return loss, reconstruction


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator of the latent-diffusion autoencoders (pix2pix's NLayerDiscriminator): `layers`
    stride-2 4x4 convolutions, one stride-1, then a 1-channel map of logits, one per overlapping patch
    (6x6 for 32x32 images with 2 layers). BatchNorm and N(0, 0.02) initialisation as the recipe's."""

    def __init__(self, channels: int, width: int = 32, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        out = width
        for n in range(1, layers + 1):  # the last of these has stride 1
            previous, out = out, width * min(2**n, 8)
            blocks += [nn.Conv2d(previous, out, 4, 2 if n < layers else 1, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(out, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def patch_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss over patches, as the recipe's: (mean relu(1 - real) + mean relu(1 + fake)) / 2."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def adaptive_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """|d reconstruction_loss / d last_layer| / (|d adversarial_loss / d last_layer| + 1e-4), clamped to [0, max_weight]
    and detached (Esser et al. 2021, eq. 7): the adversarial term's gradient at the decoder's output layer is kept at
    the reconstruction term's scale, whatever the losses' units. Both losses keep their graphs for the backward."""
    reconstruction_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adversarial_grad = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    weight = reconstruction_grad.float().norm() / (adversarial_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def diffusion_loss(
    unet: nn.Module, schedule: DDPMScheduler, x0: torch.Tensor, labels: torch.Tensor, num_classes: int,
    label_dropout: float, generator: torch.Generator, min_snr_gamma: float | None = None, alignment_target: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-sample MSE of the epsilon or v target at uniform random timesteps, optionally min-SNR-gamma weighted. (N,)
    With `alignment_target` (the encoder's features of x0) the network is a gen_core.alignment.AlignedDenoiser:
    -> (that MSE, the alignment loss), both (N,)."""
    n, device = len(x0), x0.device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    timesteps = torch.randint(0, schedule.config.num_train_timesteps, (n,), generator=generator).to(device)
    drop = (torch.rand(n, generator=generator) < label_dropout).to(device)
    labels = torch.where(drop, torch.full_like(labels, num_classes), labels)  # the null class: CFG's unconditional model
    noisy = schedule.add_noise(x0, noise, timesteps)
    target = noise if schedule.config.prediction_type == "epsilon" else schedule.get_velocity(x0, noise, timesteps)
    output = unet(noisy, timesteps, class_labels=labels, return_dict=False)
    loss = F.mse_loss(output[0].float(), target, reduction="none").flatten(1).mean(1)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(schedule, timesteps, min_snr_gamma).to(device)
    return loss if alignment_target is None else (loss, alignment_loss(output[1], alignment_target))


def edm_loss(
    network: nn.Module, x0: torch.Tensor, labels: torch.Tensor, num_classes: int, label_dropout: float,
    generator: torch.Generator, edm: EdmConfig, sigma_data: float, alignment_target: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """EDM's training loss (Karras et al. 2022, eq. 8 with Table 1's choices), per sample: ln(sigma) ~ N(p_mean, p_std^2),
    x = x0 + sigma n, and lambda(sigma) |D(x; sigma) - x0|^2 with lambda = 1 / c_out^2, which is the plain MSE of the network's
    output F(c_in x, c_noise) against its effective target (x0 - c_skip x) / c_out. (N,); with `alignment_target`, as
    diffusion_loss's."""
    n, device = len(x0), x0.device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    sigma = (torch.randn(n, generator=generator) * edm.p_std + edm.p_mean).exp().to(device).view(-1, 1, 1, 1)
    drop = (torch.rand(n, generator=generator) < label_dropout).to(device)
    labels = torch.where(drop, torch.full_like(labels, num_classes), labels)  # the null class: CFG's unconditional model
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    x = x0 + sigma * noise
    output = network(c_in * x, (c_noise * EDM_TIMESTEP_SCALE).flatten(), class_labels=labels, return_dict=False)
    target = (x0 - c_skip * x) / c_out
    loss = F.mse_loss(output[0].float(), target, reduction="none").flatten(1).mean(1)
    return loss if alignment_target is None else (loss, alignment_loss(output[1], alignment_target))


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity along channels, averaged over positions, per sample (N,), in [0, 2]. The finer of the two
    grids is average-pooled to the coarser (pixel-space denoisers tap a 32 x 32 grid, the target is 8 x 8)."""
    size = min(projected.shape[-1], target.shape[-1])
    projected = F.adaptive_avg_pool2d(projected.float(), size)
    target = F.adaptive_avg_pool2d(target.float(), size)
    return 1.0 - F.cosine_similarity(projected, target, dim=1).mean((1, 2))


def min_snr_weight(schedule: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023): the x0
    loss weight min(SNR, gamma), expressed for the network's target: an epsilon loss is SNR times an x0 loss and
    a v loss SNR + 1 times one, so the weights are min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1). (N,)"""
    alphas_cumprod = schedule.alphas_cumprod.to(torch.float64)[timesteps.cpu()]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    capped = snr.clamp(max=gamma)
    return (capped / snr if schedule.config.prediction_type == "epsilon" else capped / (snr + 1)).float()


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2). (N,)"""
    mse = (reference.float() - reconstruction.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


# ---------------------------------------------------------------------------
# Exported model: diffusers-format directory + generator.json
# ---------------------------------------------------------------------------


PIPELINE_MODULE = "genforge_pipeline"  # <export>/genforge_pipeline.py: the diffusers pipeline class, for DiffusionPipeline.from_pretrained
DIT_MODULE = "genforge_dit"  # <export>/unet/genforge_dit.py: the DiT's class, for the same


@dataclass
class DiffusionGenerator:
    """A trained class-conditional diffusion model that samples images.

    On disk (save_pretrained): unet/ and (latent space) vae/ in diffusers format, scheduler/ with
    the training noise schedule, generator.json with the class names and default sampler.
    """

    unet: UNet2DModel | GenforgeDiT  # the denoiser, whatever its backbone (diffusers' component name)
    vae: AutoencoderKL | None  # None: the denoiser works on pixels
    schedule_config: dict
    num_classes: int
    sampler: SamplerConfig
    image_shape: tuple[int, int, int]  # (C, R, R) of the decoded images
    edm_sigma_data: float | None = None  # an EDM network (its data's std): sampled through EDMDenoiser
    guide: UNet2DModel | GenforgeDiT | None = None  # sampler.guidance autoguidance / guide_null / guide_blend: the weaker denoiser
    guide_edm_sigma_data: float | None = None  # the guide's, when it is an EDM network

    def __post_init__(self):
        if (self.guide is None) != (self.sampler.guidance == "cfg"):
            raise LatentMismatchError(f"sampler guidance {self.sampler.guidance} " + ("needs a guide" if self.guide is None else "takes no guide"))

    @property
    def denoiser(self) -> nn.Module:
        """What the samplers call: (x_t, timestep, class_labels) -> the schedule's prediction."""
        return self.unet if self.edm_sigma_data is None else EDMDenoiser(self.unet, self.schedule_config, self.edm_sigma_data)

    @property
    def guide_denoiser(self) -> nn.Module | None:
        """The guide as the samplers call it (None for classifier-free guidance)."""
        if self.guide is None or self.guide_edm_sigma_data is None:
            return self.guide
        return EDMDenoiser(self.guide, self.schedule_config, self.guide_edm_sigma_data)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def to(self, device) -> "DiffusionGenerator":
        for module in (self.unet, self.vae, self.guide):
            if module is not None:
                module.to(device)
        return self

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, seeds, device: torch.device | str = "cpu", *, sampler: str | None = None,
               num_steps: int | None = None, guidance_scale: float | None = None, autocast_dtype=None) -> torch.Tensor:  # fmt: skip
        """Images (N, C, R, R) in [-1, 1]; sample i depends only on (labels[i], seeds[i])."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        latents = sample_diffusion(
            self.denoiser, self.schedule_config, labels, seeds, self.latent_shape, self.num_classes,
            sampler or self.sampler.name, num_steps or self.sampler.num_steps,
            self.sampler.guidance_scale if guidance_scale is None else guidance_scale, device, autocast_dtype,
            self.sampler.guidance_interval, self.guide_denoiser, self.sampler.guidance, self.sampler.guide_blend,
        )  # fmt: skip
        if self.vae is None:
            return latents.clamp(-1, 1)
        return decode_latents(self.vae, latents).clamp(-1, 1)

    def save_pretrained(self, directory: str | Path, meta: dict) -> None:
        """unet/, vae/, scheduler/ in diffusers format, and what makes the directory a diffusers pipeline:
        model_index.json naming gen_core.diffusers_pipeline's class, a copy of that file as genforge_pipeline.py."""
        directory = Path(directory)
        pipeline = GenforgeLatentDiffusionPipeline(
            self.unet, make_sampler("ddpm", self.schedule_config), self.vae, self.guide, meta.get("class_names"), self.sampler.name,
            self.sampler.num_steps, self.sampler.guidance_scale, list(self.image_shape), self.edm_sigma_data,
            list(self.sampler.guidance_interval) if self.sampler.guidance_interval else None, self.sampler.guidance,
            self.guide_edm_sigma_data, self.sampler.guide_blend,
        )  # fmt: skip
        pipeline.save_pretrained(directory, safe_serialization=True)
        index = json.loads((directory / "model_index.json").read_text())
        index["_class_name"] = [PIPELINE_MODULE, GenforgeLatentDiffusionPipeline.__name__]  # diffusers loads it from the .py beside it
        shutil.copyfile(Path(diffusers_pipeline.__file__), directory / f"{PIPELINE_MODULE}.py")
        for name, network in (("unet", self.unet), ("guide", self.guide)):
            if isinstance(network, GenforgeDiT):  # a custom component: diffusers loads it from <name>/<module>.py
                index[name] = [DIT_MODULE, GenforgeDiT.__name__]
                shutil.copyfile(Path(dit.__file__), directory / name / f"{DIT_MODULE}.py")
        (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        info = {**meta, "family": "ldm", "space": "pixel" if self.vae is None else "latent", "num_classes": self.num_classes,
                "image_shape": list(self.image_shape), "sampler": self.sampler.model_dump(), "edm_sigma_data": self.edm_sigma_data,
                **({"guide_edm_sigma_data": self.guide_edm_sigma_data} if self.guide is not None else {})}  # fmt: skip
        (directory / "generator.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> tuple["DiffusionGenerator", dict]:
        directory = Path(directory)
        try:
            meta = json.loads((directory / "generator.json").read_text())
        except FileNotFoundError:
            raise LatentMismatchError(f"{directory}: no generator.json (not an exported genforge diffusion model)") from None
        unet = load_denoiser(directory / "unet")
        guide = load_denoiser(directory / "guide") if (directory / "guide").is_dir() else None
        vae = None
        if meta["space"] == "latent":
            vae = AutoencoderKL.from_pretrained(directory / "vae", **PRETRAINED).eval()
            check_latent_match(unet.config.in_channels, vae, str(directory))
        schedule = DDPMScheduler.from_pretrained(directory / "scheduler").config
        model = cls(unet, vae, dict(schedule), meta["num_classes"], SamplerConfig(**meta["sampler"]), tuple(meta["image_shape"]),
                    meta.get("edm_sigma_data"), guide, meta.get("guide_edm_sigma_data"))  # fmt: skip
        return model, meta


def load_denoiser(directory: Path) -> UNet2DModel | GenforgeDiT:
    """An exported denoiser component (unet/ or guide/), in eval mode."""
    config = json.loads((directory / "config.json").read_text())
    return denoiser_class(config).from_pretrained(directory, **PRETRAINED).eval()


def load_guide(directory: str | Path, schedule_config: dict, latent_shape, num_classes: int, space: str,
               autoencoder_sha256: str | None) -> tuple[UNet2DModel | GenforgeDiT, float | None]:  # fmt: skip
    """The denoiser of the exported diffusion model in `directory`, as the guide of a model with these properties ->
    (network, its EDM sigma_data or None). LatentMismatchError naming what differs when it does not work in the same
    space (autoencoder weights by sha256, latent shape) with the same noise schedule and classes."""
    if not (Path(directory) / "generator.json").is_file():
        raise LatentMismatchError(f"{directory}: no exported guide (train it first with train_ldm: a smaller, shorter run on the same latents)")
    guide, meta = DiffusionGenerator.from_pretrained(directory)
    held = meta.get("autoencoder", {}).get("sha256") if meta["space"] == "latent" else None
    checks = (
        ("space", meta["space"], space), ("latent shape", list(guide.latent_shape), list(latent_shape)),
        ("classes", guide.num_classes, num_classes), ("autoencoder sha256", held, autoencoder_sha256),
        ("noise schedule", {k: guide.schedule_config.get(k) for k in FORWARD_PROCESS}, {k: schedule_config.get(k) for k in FORWARD_PROCESS}),
    )  # fmt: skip
    for what, theirs, ours in checks:
        if theirs != ours:
            raise LatentMismatchError(f"{directory}: not a guide for this model: its {what} is {theirs}, the model's {ours}")
    return guide.unet, guide.edm_sigma_data


def diffusion_generator(ldm, data, unet: UNet2DModel | GenforgeDiT, vae: AutoencoderKL | None, num_classes: int,
                        edm_sigma_data: float | None = None, guide: tuple | None = None) -> DiffusionGenerator:  # fmt: skip
    """A trained denoiser as a generator, with the training schedule and the configured sampler.
    `ldm`, `data`: gen_core.config.LdmConfig and DataConfig; `edm_sigma_data`: the run's, for an EDM network;
    `guide`: load_guide's (network, sigma_data) for sampler.guidance autoguidance / guide_null."""
    image_shape = (data.channels, data.resolution, data.resolution)
    network, sigma = guide or (None, None)
    return DiffusionGenerator(unet, vae, dict(training_schedule(ldm.noise).config), num_classes, ldm.sampler, image_shape, edm_sigma_data,
                              network, sigma)  # fmt: skip


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (as the denoiser sees them) -> images."""
    return vae.decode(from_denoiser_latents(latents, vae.config)).sample.float()


def check_latent_match(denoiser_channels: int, vae: AutoencoderKL, where: str) -> None:
    if denoiser_channels != vae.config.latent_channels:
        raise LatentMismatchError(
            f"{where}: denoiser expects {denoiser_channels} latent channels, autoencoder has {vae.config.latent_channels}"
        )
