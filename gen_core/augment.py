"""DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", NeurIPS 2020).

The discriminator sees augmented images only, real and fake alike, in every D and G pass; the
augmentations are differentiable, so G learns through them. Each sample draws its own parameters from
the `noise` generator the training step is seeded with (per step and rank), so a run is reproducible.

Policies: `color` (brightness, saturation, contrast), `translation` (shift by up to 1/8 of the side,
zero padding), `cutout` (a square of half the side set to zero). Images are in [-1, 1].
"""

from __future__ import annotations

import torch

POLICIES = ("color", "translation", "cutout")


def diff_augment(x: torch.Tensor, policy: tuple[str, ...] | list[str], noise: torch.Generator | None) -> torch.Tensor:
    """x (N, C, H, W) -> the same shape, each sample augmented by every transform of `policy`, in order."""
    for name in policy:
        x = _TRANSFORMS[name](x, noise)
    return x


def _uniform(n: int, noise, x: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, 1, 1, 1, generator=noise).to(device=x.device, dtype=x.dtype)


def _color(x: torch.Tensor, noise) -> torch.Tensor:
    n = len(x)
    x = x + (_uniform(n, noise, x) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(n, noise, x) * 2) + mean  # saturation (the identity for one channel)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(n, noise, x) + 0.5) + mean  # contrast


def _grids(x: torch.Tensor):
    n, _, h, w = x.shape
    return torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")


def _translation(x: torch.Tensor, noise, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (n, 1, 1), generator=noise).to(x.device)
    tx = torch.randint(-sw, sw + 1, (n, 1, 1), generator=noise).to(x.device)
    batch, gy, gx = _grids(x)
    gy = torch.clamp(gy + ty + 1, 0, h + 1)  # indexes of the 1-pixel zero-padded image: out of range reads padding
    gx = torch.clamp(gx + tx + 1, 0, w + 1)
    padded = torch.nn.functional.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[batch, gy, gx].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, noise, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=noise).to(x.device)
    ox = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=noise).to(x.device)
    batch, gy, gx = _grids(x[:, :1, :ch, :cw])
    gy = torch.clamp(gy + oy - ch // 2, 0, h - 1)
    gx = torch.clamp(gx + ox - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, device=x.device, dtype=x.dtype)
    mask[batch, gy, gx] = 0
    return x * mask.unsqueeze(1)


_TRANSFORMS = {"color": _color, "translation": _translation, "cutout": _cutout}
