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
    arch: str = "dcgan"  # a key of GAN_ARCHS (exports before the ResNet preset have no arch: dcgan)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DiscriminatorSpec:
    resolution: int
    channels: int
    num_classes: int
    width: int
    spectral_norm: bool
    arch: str = "dcgan"
    mbstd_group: int = 0  # minibatch standard deviation over groups of this many samples; 0: off


def gan_specs(model, resolution: int, channels: int, num_classes: int) -> tuple[GeneratorSpec, "DiscriminatorSpec"]:
    """The GAN's two specs from its model config (gen_core.config.GanModelConfig) and the data shape."""
    return (
        GeneratorSpec(resolution, channels, num_classes, model.z_dim, model.g_width, model.arch),
        DiscriminatorSpec(resolution, channels, num_classes, model.d_width, model.spectral_norm, model.arch, model.mbstd_group),
    )


def build_generator(spec: GeneratorSpec) -> nn.Module:
    return GAN_ARCHS[spec.arch][0](spec)


def build_discriminator(spec: DiscriminatorSpec) -> nn.Module:
    return GAN_ARCHS[spec.arch][1](spec)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
        self.mbstd = MinibatchStd(spec.mbstd_group) if spec.mbstd_group else None
        if self.mbstd is not None:  # the statistic's channel is mixed into the 4x4 features by one more conv
            self.mix = nn.Sequential(sn(nn.Conv2d(channels + 1, channels, 3, 1, 1)), nn.LeakyReLU(0.2, True))
        self.linear = sn(nn.Linear(channels * 16, 1))
        self.embed = sn(nn.Embedding(spec.num_classes, channels * 16))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.body(images)
        if self.mbstd is not None:
            features = self.mix(self.mbstd(features))
        features = features.flatten(1)
        return self.linear(features).squeeze(1) + (self.embed(labels) * features).sum(1)


class MinibatchStd(nn.Module):
    """StyleGAN's minibatch standard deviation: one extra feature map holding the mean standard deviation of
    the features over a group of samples, so D can see a batch that lacks variety.

    Groups are runs of `group` consecutive samples: D's batches are [real; fake] (and interpolates), so with
    every part a multiple of `group` long no group mixes real with fake. (StyleGAN's own layout strides
    the groups over the batch, which would mix them.)"""

    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        group = min(self.group, n)
        if n % group:
            raise ValueError(f"minibatch stddev: a batch of {n} does not split into groups of {group} (set the per-worker batch to a multiple)")
        std = x.float().reshape(n // group, group, c, h, w).var(dim=1, unbiased=False).add(1e-8).sqrt()
        stat = std.mean(dim=(1, 2, 3)).to(x.dtype).repeat_interleave(group)  # (n,)
        return torch.cat([x, stat.view(n, 1, 1, 1).expand(n, 1, h, w)], dim=1)


# --------------------------------------------------------------------------- ResNet preset


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, then a per-class gain and bias (the class-conditional G of SNGAN/BigGAN)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class _UpBlock(nn.Module):
    """cBN-ReLU-upsample-conv3-cBN-ReLU-conv3, plus an upsample-conv1 shortcut."""

    def __init__(self, cin: int, cout: int, num_classes: int):
        super().__init__()
        self.norm1, self.conv1 = ConditionalBatchNorm2d(cin, num_classes), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = ConditionalBatchNorm2d(cout, num_classes), nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.interpolate(torch.relu(self.norm1(x, labels)), scale_factor=2))
        h = self.conv2(torch.relu(self.norm2(h, labels)))
        return h + self.shortcut(nn.functional.interpolate(x, scale_factor=2))


class ResNetGenerator(nn.Module):
    """Class-conditional ResNet generator (SNGAN/BigGAN-style, Miyato et al. 2018 for 32x32).

    forward(z (N, z_dim), labels (N,)) -> images (N, C, R, R) in [-1, 1]. z is projected to 4x4; each
    up-block doubles the side with class-conditional BatchNorm; channels halve per block down to `width`."""

    def __init__(self, spec: GeneratorSpec):
        super().__init__()
        self.spec = spec
        ups = _num_upsamples(spec.resolution)
        channels = [spec.width * 2 ** (ups - i) for i in range(ups + 1)]  # 4x4 ... full resolution
        self.project = nn.Sequential(nn.Linear(spec.z_dim, channels[0] * 16), nn.Unflatten(1, (channels[0], 4, 4)))
        self.blocks = nn.ModuleList(_UpBlock(cin, cout, spec.num_classes) for cin, cout in zip(channels, channels[1:]))
        self.out = nn.Sequential(nn.BatchNorm2d(channels[-1]), nn.ReLU(True), nn.Conv2d(channels[-1], spec.channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.project(z)
        for block in self.blocks:
            x = block(x, labels)
        return self.out(x)


class _DownBlock(nn.Module):
    """(ReLU)-conv3-ReLU-conv3-avgpool, plus a conv1(-avgpool) shortcut; the first block of D skips the leading ReLU."""

    def __init__(self, cin: int, cout: int, sn, down: bool, first: bool):
        super().__init__()
        self.first, self.down = first, down
        self.conv1, self.conv2 = sn(nn.Conv2d(cin, cout, 3, 1, 1)), sn(nn.Conv2d(cout, cout, 3, 1, 1))
        self.shortcut = sn(nn.Conv2d(cin, cout, 1)) if cin != cout or down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(x if self.first else torch.relu(x))))
        skip = x
        if self.down:
            h = nn.functional.avg_pool2d(h, 2)
        if self.shortcut is not None:
            skip = self.shortcut(nn.functional.avg_pool2d(x, 2) if self.first and self.down else x)
            if self.down and not self.first:
                skip = nn.functional.avg_pool2d(skip, 2)
        return h + skip


class ResNetDiscriminator(nn.Module):
    """ResNet projection discriminator (SNGAN): down-blocks to 4x4, one more block there (after the optional
    minibatch stddev), ReLU, global sum pooling, a linear output plus the class projection."""

    def __init__(self, spec: DiscriminatorSpec):
        super().__init__()
        self.spec = spec
        sn = _spectral_norm if spec.spectral_norm else (lambda module: module)
        downs = _num_upsamples(spec.resolution)
        channels = [spec.channels] + [spec.width * 2**i for i in range(downs)]
        self.blocks = nn.Sequential(*(_DownBlock(cin, cout, sn, True, i == 0) for i, (cin, cout) in enumerate(zip(channels, channels[1:]))))
        top = channels[-1]
        self.mbstd = MinibatchStd(spec.mbstd_group) if spec.mbstd_group else None
        self.last = _DownBlock(top + (1 if self.mbstd else 0), top, sn, False, False)
        self.linear = sn(nn.Linear(top, 1))
        self.embed = sn(nn.Embedding(spec.num_classes, top))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.blocks(images)
        if self.mbstd is not None:
            x = self.mbstd(x)
        features = torch.relu(self.last(x)).sum(dim=(2, 3))
        return self.linear(features).squeeze(1) + (self.embed(labels) * features).sum(1)


GAN_ARCHS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "dcgan": (Generator, Discriminator),  # the seed's baseline
    "resnet": (ResNetGenerator, ResNetDiscriminator),
}


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
