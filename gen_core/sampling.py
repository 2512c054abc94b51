"""GAN sampling with one seeded generator per sample, and the sample-grid PNG every family writes.

Sample i always uses seed (base_seed + i), so the same images come out whatever the
number of workers, batch size or order in which samples are produced: FID is comparable.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def seeded_latents(seeds, z_dim: int) -> torch.Tensor:
    """(len(seeds), z_dim) standard-normal latents; row i depends only on seeds[i]."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def balanced_labels(indices, num_classes: int) -> torch.Tensor:
    """Sample i gets class i mod num_classes: equal counts for conditional metrics."""
    return torch.as_tensor(np.asarray(indices) % num_classes, dtype=torch.long)


def check_labels(labels, num_classes: int) -> torch.Tensor:
    """`labels` as a long tensor, or a one-line ValueError when one is outside the model's 0..num_classes-1."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class label out of range: got {labels.min().item()}..{labels.max().item()}, model has 0..{num_classes - 1}")
    return labels


@torch.no_grad()
def sample_gan(G, labels: torch.Tensor, seeds, device: torch.device | str = "cpu") -> torch.Tensor:
    """Images (N, C, R, R) in [-1, 1] for the given labels and per-sample seeds."""
    z = seeded_latents(seeds, G.spec.z_dim).to(device)
    return G(z, labels.to(device)).float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 [0, 255]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def image_grid(images_uint8: torch.Tensor, rows: int) -> np.ndarray:
    """(N, C, H, W) uint8 -> (rows*H, cols*W, C) uint8 grid, row-major."""
    n, c, h, w = images_uint8.shape
    cols = -(-n // rows)
    grid = torch.zeros(rows * cols, c, h, w, dtype=torch.uint8)
    grid[:n] = images_uint8
    grid = grid.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return grid.numpy()


def png_bytes(grid: np.ndarray) -> bytes:
    """(H, W, C) uint8 with C in {1, 3} -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    return buffer.getvalue()


def class_grid_png(generator, seed: int, device: torch.device | str = "cpu", per_class: int = 8) -> bytes:
    """One row per class, `per_class` fixed seeds per row: the same grid at every checkpoint.
    `generator` is any gen_core.generators interface (num_classes, sample(labels, seeds, device))."""
    labels = torch.arange(generator.num_classes).repeat_interleave(per_class)
    images = generator.sample(labels, [seed + i for i in range(len(labels))], device)
    return png_bytes(image_grid(to_uint8(images.cpu()), rows=generator.num_classes))
