"""The GAN recipes of gen_core (losses, penalties, DiffAugment, minibatch stddev, the ResNet preset, ramps):
shapes and finite values for every combination, the penalties against closed forms, the augmentations'
exact effect. In-process and fast; the strategies' equivalence is in test_strategies, the config's
refusals in test_config."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from gen_core.augment import POLICIES, diff_augment
from gen_core.checkpoint import CheckpointError, export_generator, load_generator
from gen_core.losses import GanObjective, discriminator_loss, generator_loss
from gen_core.models import (GAN_ARCHS, DiscriminatorSpec, GeneratorSpec, MinibatchStd, build_discriminator, build_generator,
                             parameter_count, recalibrate_batchnorm)  # fmt: skip
from gen_core.training import ramp

OBJECTIVES = {
    "hinge": GanObjective("hinge"),
    "nonsaturating-r1": GanObjective("nonsaturating", r1_gamma=1.0),
    "wgan-gp": GanObjective("wgan", gp_lambda=10.0),
    "rpgan-r1r2-lazy": GanObjective("rpgan", r1_gamma=1.0, r2_gamma=1.0, interval=4),
}


def networks(arch: str, mbstd: int, spectral_norm: bool = True):
    torch.manual_seed(0)
    return build_generator(GeneratorSpec(16, 1, 10, 8, 8, arch)), build_discriminator(DiscriminatorSpec(16, 1, 10, 8, spectral_norm, arch, mbstd))


@pytest.mark.parametrize(("arch", "objective", "augment", "mbstd"),
                         list(itertools.product(GAN_ARCHS, OBJECTIVES, [(), POLICIES], [0, 2])))  # fmt: skip
def test_every_recipe_gives_finite_losses_and_gradients(arch, objective, augment, mbstd):
    G, D = networks(arch, mbstd)
    o = GanObjective(**{**OBJECTIVES[objective].__dict__, "augment": augment})
    noise = torch.Generator().manual_seed(0)
    real, labels = torch.rand(4, 1, 16, 16) * 2 - 1, torch.arange(4)
    fake = G(torch.randn(4, 8), labels)
    assert fake.shape == (4, 1, 16, 16) and fake.abs().max() <= 1
    d_loss, penalties = discriminator_loss(o, D, real, fake.detach(), labels, noise, o.regularizes_at(0))
    d_loss.mean().backward()
    assert d_loss.shape == (4,) and torch.isfinite(d_loss).all()
    assert set(penalties) == {k for k, v in (("r1", o.r1_gamma), ("r2", o.r2_gamma), ("gp", o.gp_lambda)) if v}
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)
    D.zero_grad()
    g_loss = generator_loss(o, D, fake, labels, real, noise)
    g_loss.mean().backward()
    assert g_loss.shape == (4,) and torch.isfinite(g_loss).all()
    grads = [p.grad for p in G.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_runs_under_bf16_autocast_as_the_loop_runs_it(objective):
    """Found by the recipe benchmark: under bf16 autocast (the loop's precision on AMX) G's fakes are bf16 beside
    fp32 reals, and WGAN-GP's interpolation failed on the mixed dtypes."""
    G, D = networks("resnet", 0, spectral_norm=objective != "wgan-gp")
    o, noise = OBJECTIVES[objective], torch.Generator().manual_seed(0)
    real, labels = torch.rand(4, 1, 16, 16) * 2 - 1, torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = G(torch.randn(4, 8), labels)
        assert fake.dtype == torch.bfloat16
        d_loss, _ = discriminator_loss(o, D, real, fake.detach(), labels, noise, o.regularizes_at(0))
        g_loss = generator_loss(o, D, fake, labels, real, noise)
    (d_loss.mean() + g_loss.mean()).backward()
    assert torch.isfinite(d_loss).all() and torch.isfinite(g_loss).all()


class LinearD(torch.nn.Module):
    """D(x) = <w, x> + b_label: every sample's input gradient is w, so the penalties have closed forms."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w)
        self.b = torch.nn.Parameter(torch.tensor([0.0, 0.5]))

    def forward(self, x, labels):
        return (x * self.w).flatten(1).sum(1) + self.b[labels]


def test_penalties_match_their_closed_forms():
    w = torch.full((1, 2, 2), 0.5)  # |w|^2 = 1.0, |w| = 1.0
    w[0, 0, 0] = 1.5  # |w|^2 = 3.0
    D = LinearD(w)
    inputs = torch.Generator().manual_seed(0)
    real, fake, labels = torch.randn(3, 1, 2, 2, generator=inputs), torch.randn(3, 1, 2, 2, generator=inputs), torch.tensor([0, 1, 1])
    base, _ = discriminator_loss(GanObjective("rpgan"), D, real, fake, labels)
    o = GanObjective("rpgan", r1_gamma=2.0, r2_gamma=0.5)
    loss, penalties = discriminator_loss(o, D, real, fake, labels, regularize=True)
    assert penalties["r1"].item() == pytest.approx(3.0) and penalties["r2"].item() == pytest.approx(3.0)
    assert torch.allclose(loss, base + 2.0 / 2 * 3.0 + 0.5 / 2 * 3.0)
    # lazy: the same penalty, weighted by the interval, and only where regularize says so; a ramp scales gamma
    lazy = GanObjective("rpgan", r1_gamma=2.0, r2_gamma=0.5, interval=4)
    assert [lazy.regularizes_at(i) for i in range(6)] == [True, False, False, False, True, False]
    loss, _ = discriminator_loss(lazy, D, real, fake, labels, regularize=True, gamma_scale=0.5)
    assert torch.allclose(loss, base + 4 * 0.5 * (2.0 / 2 * 3.0 + 0.5 / 2 * 3.0))
    assert torch.allclose(discriminator_loss(lazy, D, real, fake, labels, regularize=False)[0], base)
    assert lazy.d_optimizer_scale == pytest.approx(0.8) and o.d_optimizer_scale == 1.0 and GanObjective("hinge", interval=4).d_optimizer_scale == 1.0
    # WGAN-GP: (|w| - 1)^2 on the interpolates, whatever they are
    gp = GanObjective("wgan", gp_lambda=10.0)
    loss, penalties = discriminator_loss(gp, D, real, fake, labels, torch.Generator().manual_seed(0), regularize=True)
    assert penalties["gp"].item() == pytest.approx((3.0**0.5 - 1) ** 2, rel=1e-5)
    # atol: the penalty (5.36) is summed in float32 (ulp ~5e-7), which allclose's relative tolerance misses for a loss near 0
    assert torch.allclose(loss, discriminator_loss(GanObjective("wgan"), D, real, fake, labels)[0] + 10.0 * (3.0**0.5 - 1) ** 2, atol=1e-5)
    # the penalty trains D: its gradient reaches w (a double backward)
    D.zero_grad()
    discriminator_loss(GanObjective("rpgan", r1_gamma=1.0), D, real, fake, labels, regularize=True)[0].sum().backward()
    without = LinearD(w.clone())
    discriminator_loss(GanObjective("rpgan"), without, real, fake, labels)[0].sum().backward()
    assert torch.allclose(D.w.grad - without.w.grad, 3 * w)  # d/dw of 3 samples x gamma/2 |w|^2


def test_objective_refuses_bad_combinations():
    with pytest.raises(ValueError, match="gp_lambda"):
        GanObjective("hinge", gp_lambda=1.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        GanObjective("wasserstein")
    with pytest.raises(ValueError, match="rpgan: the G loss needs the real batch"):
        generator_loss(GanObjective("rpgan"), lambda x, y: x.flatten(1).sum(1), torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))


def test_diff_augment_is_seeded_differentiable_and_exact():
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    run = lambda seed, policy=POLICIES: diff_augment(x, policy, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    assert torch.equal(diff_augment(x, (), None), x)
    # translation: every sample is itself shifted by whole pixels (within 1/8 of the side), zero where it left
    shifted = run(3, ("translation",))
    for original, out in zip(x, shifted):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(out, _shift(original, dy, dx))]
        assert len(matches) == 1, "not a pure shift by at most 2 pixels"
    # cutout: zeroes one square of half the side (8x8 here) or the part of it inside the image, nothing else
    cut = run(4, ("cutout",))
    zeroed = (cut == 0) & (x != 0)
    for mask in zeroed[:, 0]:
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert 0 < len(rows) <= 8 and 0 < len(cols) <= 8 and mask.sum() == len(rows) * len(cols)
    # colour on one channel: brightness and contrast are affine per sample; saturation is the identity
    colour = run(5, ("color",))
    for original, out in zip(x, colour):
        a = torch.stack([original.flatten(), torch.ones(original.numel())], 1)
        solution = torch.linalg.lstsq(a, out.flatten().unsqueeze(1)).solution
        assert torch.allclose(a @ solution, out.flatten().unsqueeze(1), atol=1e-5)
    # differentiable: a gradient reaches the input through all three
    x.requires_grad_(True)
    run(6).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image (C, H, W) moved so that out[y, x] = image[y + dy, x + dx], zero outside."""
    out = torch.zeros_like(image)
    h, w = image.shape[1:]
    ys, xs = slice(max(-dy, 0), min(h - dy, h)), slice(max(-dx, 0), min(w - dx, w))
    yi, xi = slice(max(dy, 0), min(h + dy, h)), slice(max(dx, 0), min(w + dx, w))
    out[:, ys, xs] = image[:, yi, xi]
    return out


def test_minibatch_stddev_groups_stay_within_real_and_fake():
    layer = MinibatchStd(2)
    real, fake = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    out = layer(torch.cat([real, fake]))
    assert out.shape == (8, 4, 4, 4)
    other = layer(torch.cat([real, fake * 10]))
    assert torch.equal(out[:4], other[:4]) and not torch.equal(out[4:, 3], other[4:, 3])  # the real half never sees the fakes
    identical = layer(torch.zeros(2, 3, 4, 4) + torch.randn(1, 3, 4, 4))
    assert identical[:, 3].max() < 1e-3  # a batch without variety shows a zero statistic: what D learns to punish
    with pytest.raises(ValueError, match="a batch of 5 does not split into groups of 2"):
        layer(torch.randn(5, 3, 4, 4))
    _, D = networks("resnet", 2)
    logits = D(torch.cat([real[:, :1].repeat(1, 1, 4, 4), fake[:, :1].repeat(1, 1, 4, 4)]), torch.zeros(8, dtype=torch.long))
    assert logits.shape == (8,)


def test_resnet_preset_exports_and_loads_like_the_dcgan(tmp_path):
    spec = GeneratorSpec(32, 1, 10, 16, 8, "resnet")
    G = build_generator(spec)
    recalibrate_batchnorm(G, num_batches=2, batch_size=8)
    export_generator(tmp_path / "g", G.state_dict(), {"family": "gan", "generator_spec": spec.to_dict()})
    loaded, meta = load_generator(tmp_path / "g")
    z, labels = torch.randn(3, 16), torch.tensor([0, 4, 9])
    assert type(loaded).__name__ == "ResNetGenerator" and torch.equal(loaded(z, labels), G.eval()(z, labels))
    assert parameter_count(loaded) == parameter_count(G)
    meta = json.loads((tmp_path / "g/generator.json").read_text())
    meta["generator_spec"]["arch"] = "stylegan9"
    (tmp_path / "g/generator.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown generator arch 'stylegan9'"):
        load_generator(tmp_path / "g")
    old = GeneratorSpec(**{k: v for k, v in GeneratorSpec(32, 1, 10, 16, 8).to_dict().items() if k != "arch"})
    assert old.arch == "dcgan"  # exports from before the presets load as the DCGAN they are


def test_ramp_runs_a_half_cosine_from_the_start_ratio_to_one():
    assert ramp(0.1, 0, 10.0) == pytest.approx(0.1) and ramp(0.1, 5000, 10.0) == pytest.approx(0.55)
    assert ramp(0.1, 10_000, 10.0) == 1.0 and ramp(0.1, 50_000, 10.0) == 1.0
    assert ramp(4.0, 0, 10.0) == pytest.approx(4.0) and ramp(4.0, 2500, 10.0) < 4.0  # a ramp down works the same way
    assert ramp(0.1, 0, None) == 1.0


def test_collapse_warnings_name_the_class_and_the_step():
    from pipelines.probe import collapse_warnings

    names = ["t-shirt", "trouser", "pullover"]
    lines = collapse_warnings([0.9, 0.08, 0.49], names, 0.5, 1500)
    assert lines == ["WARNING mode collapse suspected: class 1 (trouser) diversity 0.08 of real at step 1500",
                     "WARNING mode collapse suspected: class 2 (pullover) diversity 0.49 of real at step 1500"]  # fmt: skip
    assert collapse_warnings([0.08], names, None, 10) == [] and collapse_warnings([0.6, 1.2], names, 0.5, 10) == []
