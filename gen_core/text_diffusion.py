"""Text-conditioned latent diffusion, the network side: a diffusers UNet2DConditionModel cross-attending to the text
encoder's per-token states (gen_core.text_encoder), the training loss with text dropout to the empty prompt, and
sampling through the class-conditional samplers unchanged.

The trick that lets every sampler, guidance, EDM and the seeded per-sample noise of gen_core.diffusers_pipeline.denoise
serve text too: `PromptTable` holds one call's prompts as a table of encoder states with the empty prompt as its last
row, and is called like the class-conditional denoiser, `(x_t, timestep, class_labels)`, where label i means "prompt i"
and label K (the number of prompts) the null. Classifier-free guidance against the empty prompt is then the same guidance.

`TextDiffusionGenerator` is the exported model (train_t2i): unet/ (UNet2DConditionModel), vae/, scheduler/ in diffusers
format and generator.json with family "t2i", the sampler, the attribute scale its captions were worded with and the text
encoder's identity (model id and the sha256 of its files, checked against the installed encoder when loaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from gen_core.captions import AttributeScale, caption
from gen_core.checkpoint import CheckpointError
from gen_core.config import SamplerConfig
from gen_core.diffusion import decode_latents, diffusion_loss, sample_diffusion
from gen_core.latents import PRETRAINED
from gen_core.sampling import image_grid, png_bytes, to_uint8
from gen_core.text_encoder import MODEL_ID, TextEncoder


def build_text_denoiser(channels: int, sample_size: int, text_dim: int, block_out_channels=(64, 128), layers_per_block: int = 1,
                        attention_head_dim: int = 8) -> UNet2DConditionModel:  # fmt: skip
    """A UNet2DConditionModel whose lower level and middle cross-attend to (N, L, text_dim) token states."""
    levels = len(block_out_channels)
    cross = [i >= levels - 1 for i in range(levels)]  # the lowest level: 4x4 for 8x8 latents
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, cross_attention_dim=text_dim, attention_head_dim=attention_head_dim, norm_num_groups=32,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
    )  # fmt: skip


def with_null(hidden: torch.Tensor, mask: torch.Tensor, null_hidden: torch.Tensor, null_mask: torch.Tensor):
    """The prompts' states (K, L, D) and masks (K, L) with the empty prompt's (1, L0, D) appended as row K, all padded to
    the longer length (padding is masked out, so it changes nothing)."""
    length = max(hidden.shape[1], null_hidden.shape[1])
    pad = lambda x, value: F.pad(x, (0, 0, 0, length - x.shape[1]) if x.dim() == 3 else (0, length - x.shape[1]), value=value)  # noqa: E731
    return torch.cat([pad(hidden, 0.0), pad(null_hidden, 0.0)]), torch.cat([pad(mask, 0), pad(null_mask, 0)])


class PromptTable(nn.Module):
    """A text denoiser called as a class-conditional one: class label i selects row i of the (K + 1, L, D) state table."""

    def __init__(self, unet: UNet2DConditionModel, hidden: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.unet, self.hidden, self.mask = unet, hidden, mask

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor, return_dict: bool = False):
        rows = class_labels.to(self.hidden.device)
        return self.unet(sample, timestep, encoder_hidden_states=self.hidden[rows].to(sample.device),
                         encoder_attention_mask=self.mask[rows].to(sample.device), return_dict=False)  # fmt: skip


def text_diffusion_loss(unet: nn.Module, schedule: DDPMScheduler, x0: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
                        null_hidden: torch.Tensor, null_mask: torch.Tensor, text_dropout: float, generator: torch.Generator,
                        min_snr_gamma: float | None = None) -> torch.Tensor:  # fmt: skip
    """gen_core.diffusion.diffusion_loss itself, over the batch's prompt table: sample i's "class" is its own caption,
    and label dropout (probability `text_dropout`, seeded by `generator`) sends it to the empty prompt, the unconditional
    model guidance needs. (N,)"""
    table, table_mask = with_null(hidden, mask, null_hidden, null_mask)
    n, device = len(x0), x0.device
    return diffusion_loss(PromptTable(unet, table.to(device), table_mask.to(device)), schedule, x0, torch.arange(n, device=device), n,
                          text_dropout, generator, min_snr_gamma)  # fmt: skip


@torch.no_grad()
def sample_text_diffusion(unet: UNet2DConditionModel, schedule_config, hidden: torch.Tensor, mask: torch.Tensor, null_hidden: torch.Tensor,
                          null_mask: torch.Tensor, seeds, shape: tuple[int, ...], sampler: str = "dpmsolver++", num_steps: int = 10,
                          guidance_scale: float = 1.0, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                          guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:  # fmt: skip
    """Latents (K, *shape) for K prompts' states, sample i from seeds[i]; guidance against the empty prompt. Sample i depends
    only on (prompt i, seeds[i]): the same loop, noise and guidance batching as the class-conditional samplers."""
    table, table_mask = with_null(hidden, mask, null_hidden, null_mask)
    prompts = len(hidden)
    return sample_diffusion(PromptTable(unet, table, table_mask), schedule_config, torch.arange(prompts), seeds, shape, prompts,
                            sampler, num_steps, guidance_scale, device, autocast_dtype, guidance_interval)  # fmt: skip


@dataclass
class TextDiffusionGenerator:
    """A trained text-to-image latent diffusion model: `sample(prompts, seeds)`; image i depends only on (prompts[i], seeds[i])."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    schedule_config: dict
    sampler: SamplerConfig
    image_shape: tuple[int, int, int]
    encoder: TextEncoder
    scale: AttributeScale  # the cut points its training captions were worded with (gen_core.captions)
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def to(self, device) -> "TextDiffusionGenerator":
        self.unet.to(device)
        self.vae.to(device)
        return self

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds, device: torch.device | str = "cpu", *, sampler: str | None = None, num_steps: int | None = None,
               guidance_scale: float | None = None, autocast_dtype=None) -> torch.Tensor:  # fmt: skip
        """Images (N, C, R, R) in [-1, 1] for N prompts; guidance against the empty prompt."""
        encoded, null = self.encoder.encode(list(prompts)), self.encoder.encode([""])
        latents = sample_text_diffusion(
            self.unet, self.schedule_config, encoded.hidden, encoded.mask, null.hidden, null.mask, seeds, self.latent_shape,
            sampler or self.sampler.name, num_steps or self.sampler.num_steps,
            self.sampler.guidance_scale if guidance_scale is None else guidance_scale, device, autocast_dtype,
            self.sampler.guidance_interval,
        )  # fmt: skip
        return decode_latents(self.vae, latents).clamp(-1, 1)

    def save_pretrained(self, directory: str | Path, meta: dict) -> None:
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.vae.save_pretrained(directory / "vae", safe_serialization=True)
        DDPMScheduler.from_config(self.schedule_config).save_pretrained(directory / "scheduler")
        info = {**meta, "family": "t2i", "class_names": self.class_names, "image_shape": list(self.image_shape),
                "sampler": self.sampler.model_dump(), "attribute_scale": self.scale.to_json(),
                "text_encoder": {"model_id": MODEL_ID, "files_sha256": self.encoder.files_sha256}}  # fmt: skip
        (directory / "generator.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, encoder: TextEncoder | None = None) -> tuple["TextDiffusionGenerator", dict]:
        """The export, with the installed text encoder; refused in one line when that is not the encoder it was trained with."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "generator.json").read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{directory}: no generator.json (not an exported genforge model)") from None
        if meta.get("family") != "t2i":
            raise CheckpointError(f"{directory}/generator.json: a {meta.get('family', 'gan')} model, not t2i")
        encoder = encoder or TextEncoder()
        if meta["text_encoder"]["files_sha256"] != encoder.files_sha256:
            raise CheckpointError(f"{directory}: trained with text encoder {meta['text_encoder']['model_id']} of other files than the installed one")
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", **PRETRAINED).eval()
        vae = AutoencoderKL.from_pretrained(directory / "vae", **PRETRAINED).eval()
        schedule = dict(DDPMScheduler.from_pretrained(directory / "scheduler").config)
        model = cls(unet, vae, schedule, SamplerConfig(**meta["sampler"]), tuple(meta["image_shape"]), encoder,
                    AttributeScale.from_json(meta["attribute_scale"]), meta["class_names"])  # fmt: skip
        return model, meta


GRID_LEVELS = ((1, 1), (0, 1), (2, 1), (1, 0), (1, 2))  # (brightness, size): plain, dark, light, small, filling the frame


def grid_prompts(class_names: list[str]) -> list[str]:
    """The prompt grid's prompts, row by row: each class plain, dark, light, small and filling the frame."""
    return [caption(name, b, size) for name in class_names for b, size in GRID_LEVELS]


def prompt_grid_png(generator: TextDiffusionGenerator, seed: int, device: torch.device | str = "cpu") -> bytes:
    """One row per class, one column per GRID_LEVELS prompt, fixed seeds: the same grid at every checkpoint."""
    prompts = grid_prompts(generator.class_names)
    images = generator.sample(prompts, [seed + i for i in range(len(prompts))], device)
    return png_bytes(image_grid(to_uint8(images.cpu()), rows=generator.num_classes))
