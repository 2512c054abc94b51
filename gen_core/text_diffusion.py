"""Text-conditioned latent diffusion, the network side: a diffusers UNet2DConditionModel cross-attending to the text
encoder's per-token states (gen_core.text_encoder), the training loss with text dropout to the empty prompt, and
sampling through the class-conditional samplers unchanged.

The trick that lets every sampler, guidance, EDM and the seeded per-sample noise of gen_core.diffusers_pipeline.denoise
serve text too: `PromptTable` holds one call's prompts as a table of encoder states with the empty prompt as its last
row, and is called like the class-conditional denoiser, `(x_t, timestep, class_labels)`, where label i means "prompt i"
and label K (the number of prompts) the null. Classifier-free guidance against the empty prompt is then the same guidance.
Not used by a stage yet (issue 18): the t2i family's training stage, evaluation and export come next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from gen_core.diffusion import diffusion_loss, sample_diffusion


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
                          guidance_scale: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """Latents (K, *shape) for K prompts' states, sample i from seeds[i]; guidance against the empty prompt. Sample i depends
    only on (prompt i, seeds[i]): the same loop, noise and guidance batching as the class-conditional samplers."""
    table, table_mask = with_null(hidden, mask, null_hidden, null_mask)
    prompts = len(hidden)
    return sample_diffusion(PromptTable(unet, table, table_mask), schedule_config, torch.arange(prompts), seeds, shape, prompts,
                            sampler, num_steps, guidance_scale, device)  # fmt: skip
