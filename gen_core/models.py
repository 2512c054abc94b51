"""Networks: pure nn.Modules, tensors in and tensors out. No I/O, no losses, no distributed calls."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything needed to rebuild a generator from a state_dict (travels with checkpoints and the registry)."""

    resolution: int
    channels: int
    num_classes: int
    z_dim: int
    width: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DiscriminatorSpec:
    resolution: int
    channels: int
    num_classes: int
    width: int
    spectral_norm: bool


def gan_specs(model, resolution: int, channels: int, num_classes: int) -> tuple[GeneratorSpec, "DiscriminatorSpec"]:
    """The GAN's two specs from its model config (gen_core.config.GanModelConfig) and the data shape."""
    return (
        GeneratorSpec(resolution, channels, num_classes, model.z_dim, model.g_width),
        DiscriminatorSpec(resolution, channels, num_classes, model.d_width, model.spectral_norm),
    )


def _num_upsamples(resolution: int) -> int:
    return int(math.log2(resolution)) - 2  # 4x4 base


class Generator(nn.Module):
    """Class-conditional DCGAN generator.

    forward(z (N, z_dim), labels (N,) int64) -> images (N, C, R, R) in [-1, 1].
    The label embedding is concatenated to z; BatchNorm + ReLU; transposed convs double the size.
    """

    def __init__(self, spec: GeneratorSpec):
        super().__init__()
        self.spec = spec
        ups = _num_upsamples(spec.resolution)
        top = spec.width * 2 ** (ups - 1) if ups > 0 else spec.width
        self.embed = nn.Embedding(spec.num_classes, spec.z_dim)
        self.project = nn.Sequential(
            nn.Linear(2 * spec.z_dim, top * 16, bias=False), nn.Unflatten(1, (top, 4, 4)), nn.BatchNorm2d(top), nn.ReLU(True)
        )
        blocks, channels = [], top
        for _ in range(ups - 1):
            blocks += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2), nn.ReLU(True)]
            channels //= 2
        final = nn.ConvTranspose2d(channels, spec.channels, 4, 2, 1) if ups > 0 else nn.Conv2d(channels, spec.channels, 3, 1, 1)
        self.body = nn.Sequential(*blocks, final, nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(torch.cat([z, self.embed(labels)], dim=1)))


class Discriminator(nn.Module):
    """Projection discriminator (Miyato & Koyama 2018).

    forward(images (N, C, R, R) in [-1, 1], labels (N,)) -> logits (N,).
    No BatchNorm: D sees real and fake batches separately, and BN statistics would leak between them.
    """

    def __init__(self, spec: DiscriminatorSpec):
        super().__init__()
        self.spec = spec
        sn = _spectral_norm if spec.spectral_norm else (lambda module: module)
        layers, channels = [sn(nn.Conv2d(spec.channels, spec.width, 3, 1, 1)), nn.LeakyReLU(0.2, True)], spec.width
        for _ in range(_num_upsamples(spec.resolution)):
            layers += [sn(nn.Conv2d(channels, channels * 2, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
            channels *= 2
        self.body = nn.Sequential(*layers)
        self.linear = sn(nn.Linear(channels * 16, 1))
        self.embed = sn(nn.Embedding(spec.num_classes, channels * 16))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.body(images).flatten(1)
        return self.linear(features).squeeze(1) + (self.embed(labels) * features).sum(1)


class Classifier(nn.Module):
    """Small CNN for conditional accuracy and domain-feature FID.

    forward(images (N, C, R, R) in [-1, 1]) -> logits (N, num_classes); features() -> (N, feature_dim).
    """

    def __init__(self, channels: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.features_net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(width, width * 2, 3, padding=1), nn.BatchNorm2d(width * 2), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(width * 2, width * 4, 3, padding=1), nn.BatchNorm2d(width * 4), nn.ReLU(True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 4 * 16, feature_dim), nn.ReLU(True),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_net(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# --------------------------------------------------------------------------- helpers


def ema_beta(global_batch_size: int, images_seen: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EMA decay per step from a half-life in images (EDM). The ramp-up caps the half-life at a fraction
    of the images seen so far, so a short run is not dominated by its random initialisation."""
    halflife_images = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_images = min(halflife_images, images_seen * rampup_ratio)
    return 0.5 ** (global_batch_size / max(halflife_images, 1e-8))


@torch.no_grad()
def recalibrate_batchnorm(G: nn.Module, num_batches: int = 20, batch_size: int = 64, seed: int = 0) -> None:
    """BigGAN's "standing statistics": recompute BatchNorm running stats of G from its own samples.

    An EMA generator must not use BN statistics copied from the live G: its weights differ, and in
    eval mode the mismatch washes out the samples. Seeded, so the result is reproducible.
    """
    norms = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training, momenta = G.training, [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    G.train()
    generator = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    for _ in range(num_batches):
        z = torch.randn(batch_size, G.spec.z_dim, generator=generator).to(device)
        labels = torch.randint(0, G.spec.num_classes, (batch_size,), generator=generator).to(device)
        G(z, labels)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    G.train(was_training)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied
    (recalibrate_batchnorm the EMA model before sampling from it)."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param.detach().to(ema_param.dtype), 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def requires_grad(model: nn.Module, flag: bool) -> None:
    for param in model.parameters():
        param.requires_grad_(flag)
