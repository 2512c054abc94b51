"""The latent-diffusion model in ONNX: the denoiser `(sample, timestep, class_labels) -> prediction` (and an
autoguided model's guide, the same signature), the decoder `latents -> images`, each with a dynamic batch axis, and the
sampling loop over ONNX Runtime sessions.

The loop is gen_core.diffusion.sample_diffusion itself (the same diffusers scheduler, seeded noise and guidance
batching: the conditional and the null-class halves go through the denoiser as one batch), given an adapter
that calls the ONNX denoiser; so sample i is the torch path's image for the same label, seed and sampler, to
float32 rounding accumulated over the steps (tests/test_onnx_diffusion.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from gen_core.diffusers_pipeline import from_denoiser_latents
from gen_core.diffusion import DiffusionGenerator, sample_diffusion
from gen_core.onnx_gan import ort_session, write_onnx

class _Denoiser(nn.Module):
    """UNet2DModel (or an EDMDenoiser around one) with plain tensor inputs; the timestep is one float per sample
    (Heun's are fractional)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]


class _Decoder(nn.Module):
    """Normalised latents (as the denoiser sees them) -> images, as gen_core.diffusion.decode_latents."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        # from_denoiser_latents is an affine map per channel: latents * scale + shift, kept as constants of the graph
        zero = torch.zeros(1, vae.config.latent_channels, 1, 1)
        self.register_buffer("shift", from_denoiser_latents(zero, vae.config))
        self.register_buffer("scale", from_denoiser_latents(zero + 1, vae.config) - self.shift)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents * self.scale + self.shift).sample


def export_diffusion_onnx(model: DiffusionGenerator, directory: str | Path) -> dict[str, str]:
    """denoiser.onnx (guide.onnx for an autoguided model, decoder.onnx for a latent one) in `directory` -> {file name: sha256}."""
    directory = Path(directory)
    c, size = model.latent_shape[0], model.latent_shape[1]
    example = (torch.zeros(2, c, size, size), torch.tensor([10.0, 500.5]), torch.tensor([1, model.num_classes]))
    files = {}
    for name, network in (("denoiser.onnx", model.denoiser), ("guide.onnx", model.guide_denoiser)):
        if network is not None:
            files[name] = write_onnx(_Denoiser(network), example, ["sample", "timestep", "class_labels"], "prediction", directory / name)
    if model.vae is not None:
        files["decoder.onnx"] = write_onnx(_Decoder(model.vae), (torch.zeros(2, c, size, size),), ["latents"], "images", directory / "decoder.onnx")
    return files


class _OnnxDenoiser:
    """Called by sample_diffusion as it calls a UNet2DModel."""

    def __init__(self, session):
        self.session = session
        # float timesteps; exports before EDM and Heun took int64 ones
        self.timestep_dtype = np.int64 if session.get_inputs()[1].type == "tensor(int64)" else np.float32

    def __call__(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor, return_dict: bool = False):
        timesteps = np.full(len(sample), float(timestep), dtype=self.timestep_dtype)
        feed = {"sample": sample.float().numpy(), "timestep": timesteps, "class_labels": class_labels.numpy().astype(np.int64)}
        return (torch.from_numpy(self.session.run(["prediction"], feed)[0]),)


def sampling_record(model: DiffusionGenerator) -> dict:
    """What sampling needs besides the networks (JSON): OnnxDiffusionGenerator(directory, **record)."""
    return {"schedule_config": dict(model.schedule_config), "num_classes": model.num_classes, "sampler": model.sampler.model_dump(),
            "latent_shape": list(model.latent_shape), "latent": model.vae is not None}  # fmt: skip


class OnnxDiffusionGenerator:
    """DiffusionGenerator's `sample` over ONNX Runtime: the same schedule, samplers, seeds and guidance."""

    def __init__(self, directory: str | Path, schedule_config: dict, num_classes: int, sampler: dict, latent_shape: list[int],
                 latent: bool, threads: int | None = None):  # fmt: skip
        from gen_core.config import SamplerConfig

        directory = Path(directory)
        self.denoiser = _OnnxDenoiser(ort_session(directory / "denoiser.onnx", threads))
        self.sampler = SamplerConfig(**sampler)
        self.guide = _OnnxDenoiser(ort_session(directory / "guide.onnx", threads)) if self.sampler.guidance != "cfg" else None
        self.decoder = ort_session(directory / "decoder.onnx", threads) if latent else None
        self.schedule_config, self.num_classes = schedule_config, num_classes
        self.latent_shape = tuple(latent_shape)

    def to(self, device) -> "OnnxDiffusionGenerator":
        return self  # ONNX Runtime's CPU provider

    @torch.no_grad()
    def sample(self, labels, seeds, device=None, *, sampler: str | None = None, num_steps: int | None = None,
               guidance_scale: float | None = None, **_) -> torch.Tensor:  # fmt: skip
        labels = torch.as_tensor(labels, dtype=torch.long)
        latents = sample_diffusion(
            self.denoiser, self.schedule_config, labels, seeds, self.latent_shape, self.num_classes, sampler or self.sampler.name,
            num_steps or self.sampler.num_steps, self.sampler.guidance_scale if guidance_scale is None else guidance_scale,
            guidance_interval=self.sampler.guidance_interval, guide=self.guide, guidance=self.sampler.guidance,
            guide_blend=self.sampler.guide_blend,
        )  # fmt: skip
        if self.decoder is None:
            return latents.clamp(-1, 1)
        return torch.from_numpy(self.decoder.run(["images"], {"latents": latents.float().numpy()})[0]).clamp(-1, 1)
