"""genforge's class-conditional (latent) diffusion model as a diffusers pipeline.

Every exported diffusion model (models/ldm) is also a diffusers pipeline directory: model_index.json names this
class, and a copy of this file sits beside it as genforge_pipeline.py, so diffusers alone loads it:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("models/ldm", trust_remote_code=True)   # runs genforge_pipeline.py
    images = pipe(class_labels=["sneaker", 3], generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images

This file is that copy's source, so it imports only torch and diffusers. gen_core.diffusion.sample_diffusion calls
`denoise` below: a genforge sample and a pipeline call with the same per-image generators are the same image.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, HeunDiscreteScheduler, ImagePipelineOutput

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler, "heun": HeunDiscreteScheduler}
# heun: Karras et al. 2022's 2nd-order sampler on their noise levels (rho 7); n steps evaluate the network 2n - 1 times
FORWARD_PROCESS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type", "clip_sample")
GUIDANCE = ("cfg", "autoguidance", "guide_null", "guide_blend")  # what guidance pushes away from: see `denoise`
SAMPLER_OPTIONS = {"dpmsolver++": {"algorithm_type": "dpmsolver++", "solver_order": 2, "lambda_min_clipped": -5.1},
                   "heun": {"use_karras_sigmas": True}}
# lambda_min_clipped: DPM-Solver++ starts where lambda_t = ln(alpha_t / sigma_t) >= -5.1 instead of at t = 999; the cosine
# schedule (squaredcos_cap_v2) ends at lambda -9.9 (alpha_t 5e-5), where the data prediction x_0 = (x_t - sigma_t eps) /
# alpha_t multiplies the network's error by 2e4; the linear schedule ends at -5.06, so it starts at t = 999 as before


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
    Models", EDM), Table 1: the denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) around the network F, for
    x = x_0 + sigma n with data of standard deviation sigma_data."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4


# EDM's c_noise = ln(sigma) / 4 spans about -1.6..1.1 over its noise levels; the UNet's sinusoidal embedding was made for
# diffusers' timesteps (0..1000), so the network sees 1000 c_noise
EDM_TIMESTEP_SCALE = 1000.0


def log_sigmas(schedule_config) -> torch.Tensor:
    """(num_train_timesteps,) ln sigma_t of the training schedule's VP samples x_t = sqrt(abar_t) (x_0 + sigma_t n):
    sigma_t = sqrt((1 - abar_t) / abar_t), the noise level relative to the data."""
    alphas_cumprod = DDPMScheduler.from_config(schedule_config).alphas_cumprod.double()
    return (0.5 * ((1 - alphas_cumprod) / alphas_cumprod).log()).float()


def timestep_sigma(log_sigmas: torch.Tensor, timestep) -> torch.Tensor:
    """(N,) or (1,) noise levels of (fractional) timesteps: ln sigma interpolated linearly between integer timesteps,
    as Heun's Karras noise levels are placed."""
    log_sigmas = log_sigmas.to(getattr(timestep, "device", "cpu"))
    t = torch.as_tensor(timestep, dtype=torch.float32, device=log_sigmas.device).reshape(-1).clamp(0, len(log_sigmas) - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=len(log_sigmas) - 1)
    weight = t - low
    return ((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp()


def _channel_statistics(vae_config, like: torch.Tensor):
    """diffusers' per-channel latent statistics (`latents_mean`, `latents_std` in an AutoencoderKL's config, as SDXL-derived
    models carry them), shaped to broadcast over `like` (N, c, h, w); (None, None) when the config has none."""
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is None or std is None:
        return None, None
    shape = (1, len(mean), 1, 1)
    return (torch.tensor(mean, dtype=like.dtype, device=like.device).view(shape),
            torch.tensor(std, dtype=like.dtype, device=like.device).view(shape))  # fmt: skip


def to_denoiser_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The autoencoder's latents (posterior means) -> the denoiser's: `z * scaling_factor` (one scale for every channel, as
    Stable Diffusion), or `(z - latents_mean) * scaling_factor / latents_std` per channel when the config has those."""
    mean, std = _channel_statistics(vae_config, latents)
    if mean is None:
        return latents * vae_config["scaling_factor"]
    return (latents - mean) * vae_config["scaling_factor"] / std


def from_denoiser_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse of `to_denoiser_latents`: what the autoencoder's decoder takes."""
    mean, std = _channel_statistics(vae_config, latents)
    if mean is None:
        return latents / vae_config["scaling_factor"]
    return latents * std / vae_config["scaling_factor"] + mean


class EDMDenoiser(torch.nn.Module):
    """An EDM-trained network F, called as diffusers' samplers call an epsilon network: (x_t, timestep) -> epsilon.

    The samplers work on the training schedule's VP samples x_t = sqrt(abar_t) (x_0 + sigma_t n), sigma_t =
    sqrt((1 - abar_t) / abar_t), at integer timesteps (DDPM, DDIM, DPM-Solver++) or at timesteps interpolated linearly
    in log sigma between them (Heun on Karras noise levels); this maps them back: sigma from the timestep the same way,
    x = x_t sqrt(1 + sigma^2), D from the preconditioning, epsilon = (x - D) / sigma. So an EDM network samples with any of
    the samplers, and an epsilon network needs no wrapper."""

    def __init__(self, network, schedule_config, sigma_data: float):
        super().__init__()
        self.network, self.sigma_data = network, float(sigma_data)
        self.register_buffer("log_sigmas", log_sigmas(schedule_config), persistent=False)

    @property
    def config(self):
        return self.network.config

    def sigma(self, timestep) -> torch.Tensor:
        """(N,) or (1,) noise levels of (fractional) timesteps."""
        return timestep_sigma(self.log_sigmas, timestep)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None, return_dict: bool = False):
        sigma = self.sigma(timestep).to(sample.device).view(-1, 1, 1, 1)
        x = sample.float() * (1 + sigma**2).sqrt()
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        out = self.network(c_in * x, (c_noise * EDM_TIMESTEP_SCALE).flatten(), class_labels=class_labels, return_dict=False)[0]
        denoised = c_skip * x + c_out * out.float()
        return ((x - denoised) / sigma,)


def make_sampler(name: str, schedule_config):
    """A fresh scheduler (they hold per-run state) on the training schedule's forward process (betas, prediction type,
    clipping) with the sampler's own settings for the rest (timestep spacing above all). Only those keys are taken from
    the schedule: a saved schedule records DDPM's "leading" spacing explicitly, which started DPM-Solver++ at t = 900
    instead of 999 for exported models while the in-training evaluations, built from a fresh config, used the sampler's
    default; and from_config would give a key a config marks as a default (`_use_default_values`) the sampler's default,
    wrong for the forward process (HeunDiscreteScheduler's betas are Stable Diffusion's 0.00085..0.012, DDPM's 0.0001..0.02)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    schedule_config = dict(schedule_config)
    config = {key: schedule_config[key] for key in FORWARD_PROCESS if key in schedule_config}
    return SAMPLERS[name].from_config(config, **SAMPLER_OPTIONS.get(name, {}))


def seeded_noise(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """(len(generators), *shape) standard normal; row i depends only on generators[i]."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


def guided_steps(timesteps: torch.Tensor, schedule_config, guidance_scale: float, interval: tuple[float, float] | None) -> list[bool]:
    """Which steps mix in the null class: all when guidance is on and `interval` is None; with an interval (lo, hi),
    those whose noise level sigma_t lies in (lo, hi] (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval
    Improves Sample and Distribution Quality in Diffusion Models"): guidance at high noise levels collapses each class
    onto few modes, at low ones it changes little. The other steps are the conditional model's (guidance 1), one
    network call instead of two."""
    if guidance_scale == 1.0:
        return [False] * len(timesteps)
    if interval is None:
        return [True] * len(timesteps)
    low, high = interval
    sigmas = timestep_sigma(log_sigmas(schedule_config), timesteps.float().cpu())
    return [bool(low < sigma <= high) for sigma in sigmas.tolist()]


@torch.no_grad()
def denoise(unet, schedule_config, labels: torch.Tensor, generators: list[torch.Generator], shape: tuple[int, ...], num_classes: int,
            sampler: str, num_steps: int, guidance_scale: float, device, autocast_dtype: torch.dtype | None = None,
            guidance_interval: tuple[float, float] | None = None, guide=None, guidance: str = "cfg",
            guide_blend: float | None = None) -> torch.Tensor:  # fmt: skip
    """The reverse process from seeded noise (one generator per sample) -> x_0 (N, *shape), unclipped. Guidance pushes the
    conditional prediction away from a reference: out = ref + guidance_scale * (cond - ref), at every step, or at the steps
    whose noise level lies in `guidance_interval` (`guided_steps`). The reference (`guidance`): cfg, the same network's
    "null" class (label num_classes; one batch of both halves); autoguidance, the `guide` network's conditional prediction
    (Karras et al. 2024: a smaller, shorter-trained denoiser of the same data); guide_null, the guide's null class;
    guide_blend, guide_blend x the guide's conditional + (1 - guide_blend) x its null class."""
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance {guidance!r} (choose from {', '.join(GUIDANCE)})")
    if (guide is None) != (guidance == "cfg"):
        raise ValueError(f"guidance {guidance} " + ("needs a guide network" if guide is None else "takes no guide network"))
    if (guidance == "guide_blend") != (guide_blend is not None) or not 0 <= (guide_blend or 0) <= 1:
        raise ValueError(f"guide_blend {guide_blend}: a share in [0, 1] with guidance guide_blend, None otherwise (here {guidance})")
    share = {"autoguidance": 1.0, "guide_null": 0.0}.get(guidance, guide_blend)  # the guide's conditional share of ref
    device = torch.device(device)
    scheduler = make_sampler(sampler, schedule_config)
    scheduler.set_timesteps(num_steps, device=device)
    x = seeded_noise(generators, shape, device) * scheduler.init_noise_sigma
    labels = labels.to(device)
    null = torch.full_like(labels, num_classes)
    for t, guided in zip(scheduler.timesteps, guided_steps(scheduler.timesteps, schedule_config, guidance_scale, guidance_interval)):
        model_in = scheduler.scale_model_input(x, t)
        self_guided = guided and guide is None  # cfg: the conditional and null halves as one batch
        batch_in, batch_labels = (torch.cat([model_in, model_in]), torch.cat([labels, null])) if self_guided else (model_in, labels)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = unet(batch_in, t, class_labels=batch_labels, return_dict=False)[0].float()
            if guided and guide is not None:
                ref = guide_reference(guide, model_in, t, labels, null, share)
        if self_guided:
            out, ref = out.chunk(2)
        if guided:
            out = ref + guidance_scale * (out - ref)
        # DDPM draws fresh noise per step: per-sample generators keep it batch-independent
        step_kwargs = {"generator": generators} if sampler == "ddpm" else {}
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def guide_reference(guide, x: torch.Tensor, t, labels: torch.Tensor, null: torch.Tensor, share: float) -> torch.Tensor:
    """What a guide-based guidance pushes away from: share x the guide's conditional prediction + (1 - share) x its null
    class's; one call when share is 0 or 1, else both halves as one batch."""
    if share in (0.0, 1.0):
        return guide(x, t, class_labels=labels if share == 1.0 else null, return_dict=False)[0].float()
    cond, uncond = guide(torch.cat([x, x]), t, class_labels=torch.cat([labels, null]), return_dict=False)[0].float().chunk(2)
    return share * cond + (1 - share) * uncond


class GenforgeLatentDiffusionPipeline(DiffusionPipeline):
    """Class-conditional diffusion with classifier-free guidance: a UNet2DModel with a class embedding (label
    `num_classes` is the null class), in an AutoencoderKL's latent space (`vae`; `to_denoiser_latents` normalises them by
    its config) or on pixels (`vae` None). `scheduler` is the training noise schedule; the sampler is built from it per call. With
    `edm_sigma_data` the UNet is an EDM network, sampled through EDMDenoiser. `guide` (optional): the smaller denoiser that
    `guidance` autoguidance / guide_null / guide_blend guides against (`denoise`), an EDM network when `guide_edm_sigma_data` is set."""

    model_cpu_offload_seq = "unet->guide->vae"
    _optional_components = ["vae", "guide"]

    def __init__(self, unet, scheduler, vae=None, guide=None, class_names: list[str] | None = None, sampler: str = "dpmsolver++",
                 num_steps: int = 10, guidance_scale: float = 1.0, image_shape: list[int] | None = None, edm_sigma_data: float | None = None,
                 guidance_interval: list[float] | None = None, guidance: str = "cfg", guide_edm_sigma_data: float | None = None,
                 guide_blend: float | None = None):  # fmt: skip
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, guide=guide)
        self.register_to_config(class_names=class_names, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                                image_shape=image_shape, edm_sigma_data=edm_sigma_data, guidance_interval=guidance_interval,
                                guidance=guidance, guide_edm_sigma_data=guide_edm_sigma_data, guide_blend=guide_blend)  # fmt: skip

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1  # the last embedding is the null class

    def network(self, module, sigma_key: str):
        """`module` as the samplers call it: itself, or an EDMDenoiser around it when the config holds its sigma_data."""
        sigma_data = getattr(self.config, sigma_key, None)  # older exports: None
        return module if sigma_data is None else EDMDenoiser(module, self.scheduler.config, sigma_data)

    def class_ids(self, class_labels) -> torch.Tensor:
        """Ids or names (any case) -> (N,) ids; ValueError naming the first unknown one."""
        labels = [class_labels] if isinstance(class_labels, (int, str)) else list(torch.as_tensor(class_labels).tolist()
                                                                                      if isinstance(class_labels, torch.Tensor) else class_labels)  # fmt: skip
        names = {name.lower(): i for i, name in enumerate(self.config.class_names or [])}
        ids = []
        for label in labels:
            if isinstance(label, str) and label.lower() in names:
                ids.append(names[label.lower()])
            elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < self.num_classes:
                ids.append(label)
            else:
                raise ValueError(f"class label {label!r} out of range: the model has 0..{self.num_classes - 1}"
                                 + (f" ({', '.join(self.config.class_names)})" if self.config.class_names else ""))  # fmt: skip
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil", return_dict: bool = True):  # fmt: skip
        """class_labels: ids or names, one per image. generator: one per image (image i depends only on generator i, as in
        genforge's seeded sampling), or one for all. Defaults: the exported sampler, steps and guidance. output_type:
        "pil", "np" ((N, H, W, C) in [0, 1]) or "pt" ((N, C, H, W) in [0, 1])."""
        labels = self.class_ids(class_labels)
        if generator is None:
            generator = [torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2**62, (len(labels),)).tolist()]
        generators = generator if isinstance(generator, list) else [generator] * len(labels)
        if len(generators) != len(labels):
            raise ValueError(f"{len(generators)} generators for {len(labels)} images: one per image, or one for all")
        sample_size = self.unet.config.sample_size
        guide = getattr(self, "guide", None)  # older exports: none
        latents = denoise(
            self.network(self.unet, "edm_sigma_data"), self.scheduler.config, labels, generators, (self.unet.config.in_channels, sample_size, sample_size),
            self.num_classes, sampler or self.config.sampler, num_inference_steps or self.config.num_steps,
            self.config.guidance_scale if guidance_scale is None else guidance_scale, self.unet.device,
            guidance_interval=getattr(self.config, "guidance_interval", None),  # older exports: every step
            guide=None if guide is None else self.network(guide, "guide_edm_sigma_data"), guidance=getattr(self.config, "guidance", "cfg"),
            guide_blend=getattr(self.config, "guide_blend", None),
        )  # fmt: skip
        images = latents if self.vae is None else self.vae.decode(from_denoiser_latents(latents, self.vae.config)).sample.float()
        images = ((images.clamp(-1, 1) + 1) / 2).cpu()
        if output_type == "pt":
            output = images
        elif output_type in ("np", "pil"):
            output = images.permute(0, 2, 3, 1).numpy()
            output = self.numpy_to_pil(output) if output_type == "pil" else output
        else:
            raise ValueError(f"output_type {output_type!r}: one of pil, np, pt")
        return ImagePipelineOutput(images=output) if return_dict else (output,)
