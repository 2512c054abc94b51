"""Pix2Pix (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks"), the network side:
a U-Net generator A -> B with skip connections, the PatchGAN discriminator judging (A, B) pairs patch by patch
(gen_core.diffusion.PatchDiscriminator on the concatenated channels), and the losses: the conditional GAN's
cross-entropy plus lambda x L1 to the target (lambda 100 in the paper).

The paper's discriminator has a 70x70 receptive field on 256x256 images; `patch_layers` picks the depth whose field is
closest to the same share of a smaller image (`receptive_field` computes it). No dropout in G: the paper's dropout is
its only noise source and would need seeding per (step, rank) like the rest of the loop's noise; not used by a stage yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gen_core.diffusion import PatchDiscriminator

PAPER_FIELD_SHARE = 70 / 256  # the paper's receptive field over its image side


class UNetGenerator(nn.Module):
    """(N, in_channels, R, R) in [-1, 1] -> (N, out_channels, R, R) in [-1, 1]; `levels` stride-2 halvings (R divisible by
    2**levels), widths doubling to at most 8x `width`, each decoder level fed the encoder's map of its size."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, levels: int = 3):
        super().__init__()
        widths = [width * min(2**i, 8) for i in range(levels)]
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            layers = [nn.Conv2d(in_channels if i == 0 else widths[i - 1], w, 4, 2, 1)]
            self.down.append(nn.Sequential(*layers, *([nn.InstanceNorm2d(w, affine=True)] if i else []), nn.LeakyReLU(0.2)))
        self.up = nn.ModuleList()
        for i in reversed(range(1, levels)):  # from the bottleneck up; input: the level below (+ its skip, but the lowest)
            source = widths[i] if i == levels - 1 else 2 * widths[i]
            self.up.append(nn.Sequential(nn.ConvTranspose2d(source, widths[i - 1], 4, 2, 1), nn.InstanceNorm2d(widths[i - 1], affine=True), nn.ReLU()))
        self.out = nn.ConvTranspose2d(2 * widths[0] if levels > 1 else widths[0], out_channels, 4, 2, 1)
        self.levels = levels

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] % 2**self.levels:
            raise ValueError(f"pix2pix generator: image side {a.shape[-1]} must be divisible by 2**levels = {2**self.levels}")
        skips = []
        x = a
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck feeds the first up block directly
        for block in self.up:
            x = torch.cat([block(x), skips.pop()], dim=1)
        return torch.tanh(self.out(x))


def receptive_field(layers: int) -> int:
    """The receptive field (pixels) of PatchDiscriminator(layers=layers): 4x4 convolutions, `layers` of stride 2, then two of stride 1."""
    field = 1
    for stride in [1, 1] + [2] * layers:  # from the output back to the input
        field = (field - 1) * stride + 4
    return field


def patch_layers(resolution: int) -> int:
    """The discriminator depth whose receptive field is nearest the paper's share of the image (at least 1)."""
    target = PAPER_FIELD_SHARE * resolution
    return min(range(1, 6), key=lambda layers: (abs(receptive_field(layers) - target), layers))


def build_patch_discriminator(a_channels: int, b_channels: int, resolution: int, width: int = 32) -> PatchDiscriminator:
    """The conditional PatchGAN: judges the channel concatenation of (A, B)."""
    return PatchDiscriminator(a_channels + b_channels, width, patch_layers(resolution))


def pix2pix_d_loss(G: nn.Module, D: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D's loss: real pairs (A, B) as 1 and translated pairs (A, G(A)) as 0, patch-wise cross-entropy, halved as in the paper."""
    with torch.no_grad():
        fake = G(a)
    real_logits, fake_logits = D(torch.cat([a, b], 1)).float(), D(torch.cat([a, fake], 1)).float()
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    return 0.5 * (real + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def pix2pix_g_loss(G: nn.Module, D: nn.Module, a: torch.Tensor, b: torch.Tensor, l1_weight: float = 100.0) -> tuple[torch.Tensor, dict]:
    """G's loss: fool D on (A, G(A)) plus l1_weight x mean |G(A) - B|. -> (loss, {"adversarial": ..., "l1": ...})."""
    fake = G(a)
    logits = D(torch.cat([a, fake], 1)).float()
    adversarial = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    l1 = (fake.float() - b.float()).abs().mean()
    return adversarial + l1_weight * l1, {"adversarial": adversarial.detach(), "l1": l1.detach()}
