import copy

import pytest
import torch

from gen_core.losses import GanObjective, discriminator_loss, generator_loss
from gen_core.models import Classifier, Discriminator, DiscriminatorSpec, Generator, GeneratorSpec, update_ema
from gen_core.sampling import balanced_labels, image_grid, sample_gan, seeded_latents, to_uint8
from gen_core.training import batch_indices, step_generator


@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(resolution, channels):
    G = Generator(GeneratorSpec(resolution, channels, 10, 16, 8))
    D = Discriminator(DiscriminatorSpec(resolution, channels, 10, 8, True))
    z, y = torch.randn(4, 16), torch.arange(4)
    images = G(z, y)
    assert images.shape == (4, channels, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert D(images, y).shape == (4,)
    assert Classifier(channels, 10, 8, 16)(images).shape == (4, 10)


class ConstantD(torch.nn.Module):
    def __init__(self, real_logit: float, fake_logit: float):
        super().__init__()
        self.real_logit, self.fake_logit = real_logit, fake_logit

    def forward(self, images, labels):  # first half real, second half fake (one forward, see losses)
        n = len(images) // 2
        return torch.cat([torch.full((n,), self.real_logit), torch.full((len(images) - n,), self.fake_logit)])


def test_loss_values():
    real, fake, y = torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)
    D = ConstantD(0.5, -2.0)
    softplus = torch.nn.functional.softplus
    hinge, penalties = discriminator_loss(GanObjective("hinge"), D, real, fake, y)
    assert torch.allclose(hinge, torch.full((3,), 0.5 + 0.0)) and penalties == {}  # relu(1-0.5) + relu(1-2)
    ns, _ = discriminator_loss(GanObjective("nonsaturating"), D, real, fake, y)
    assert torch.allclose(ns, (softplus(torch.tensor(-0.5)) + softplus(torch.tensor(-2.0))).expand(3))
    wgan, _ = discriminator_loss(GanObjective("wgan"), D, real, fake, y)
    assert torch.allclose(wgan, torch.full((3,), -2.0 - 0.5))  # D(fake) - D(real)
    rp, _ = discriminator_loss(GanObjective("rpgan"), D, real, fake, y)
    assert torch.allclose(rp, softplus(torch.tensor(-2.0 - 0.5)).expand(3))  # -log sigmoid(D(real) - D(fake))
    g_fake = lambda images, labels: torch.full((len(images),), 1.5)  # noqa: E731
    assert torch.allclose(generator_loss(GanObjective("hinge"), g_fake, fake, y), torch.full((3,), -1.5))
    assert torch.allclose(generator_loss(GanObjective("wgan"), g_fake, fake, y), torch.full((3,), -1.5))
    assert torch.allclose(generator_loss(GanObjective("nonsaturating"), g_fake, fake, y), softplus(torch.tensor(-1.5)).expand(3))
    # rpgan's G loss pairs each fake with a real: softplus(D(real) - D(fake)) = softplus(0.5 - (-2))
    assert torch.allclose(generator_loss(GanObjective("rpgan"), D, fake, y, real), softplus(torch.tensor(2.5)).expand(3))


def test_ema_moves_toward_model_and_copies_buffers():
    G = Generator(GeneratorSpec(8, 1, 2, 4, 8))
    ema = copy.deepcopy(G)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        for b in G.buffers():
            b.fill_(3)
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, G, decay=0.9)
    for old, new, target in zip(before, ema.parameters(), G.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * target)
    assert all(torch.equal(a, b) for a, b in zip(ema.buffers(), G.buffers()))


def test_sampling_is_per_seed_whatever_the_split():
    G = Generator(GeneratorSpec(16, 1, 10, 8, 8)).eval()
    labels = balanced_labels(range(12), 10)
    seeds = list(range(100, 112))
    whole = sample_gan(G, labels, seeds)
    parts = torch.cat([sample_gan(G, labels[i::3], seeds[i::3]) for i in range(3)])
    order = torch.cat([torch.arange(12)[i::3] for i in range(3)])
    assert torch.allclose(whole[order], parts, atol=1e-6)
    assert not torch.allclose(seeded_latents([1], 8), seeded_latents([2], 8))
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_image_grid_layout():
    images = to_uint8(torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 2, 2))
    grid = image_grid(images, rows=2)
    assert grid.shape == (4, 6, 1)
    assert grid[0, 0, 0] == images[0, 0, 0, 0] and grid[2, 0, 0] == images[3, 0, 0, 0]


def test_batch_indices_are_seeded_epoch_permutations_independent_of_world_size():
    n, batch = 50, 16
    one = torch.cat([batch_indices(s, batch, n, seed=3, rank=0, world_size=1) for s in range(6)])
    # the first epoch (50 samples) is a permutation
    assert sorted(one[:48].tolist()) == sorted(set(one[:48].tolist()))
    for step in range(6):
        split = [batch_indices(step, batch, n, 3, r, 2) for r in range(2)]
        whole = batch_indices(step, batch, n, 3, 0, 1)
        assert sorted(torch.cat(split).tolist()) == sorted(whole.tolist())
    assert not torch.equal(batch_indices(0, batch, n, 3, 0, 1), batch_indices(0, batch, n, 4, 0, 1))


def test_step_noise_is_a_function_of_seed_step_rank():
    a = torch.randn(4, generator=step_generator(0, 7, 1))
    assert torch.equal(a, torch.randn(4, generator=step_generator(0, 7, 1)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(0, 7, 0)))


def test_ema_beta_halflife_and_rampup():
    from gen_core.models import ema_beta

    # without ramp-up: after `halflife` images the old weights count one half
    beta = ema_beta(100, 10**9, halflife_kimg=1.0, rampup_ratio=None)
    assert beta**10 == pytest.approx(0.5)
    # early in training the ramp-up shortens the half-life (faster tracking)
    assert ema_beta(100, 1000, 1.0, 0.05) < ema_beta(100, 10**6, 1.0, 0.05)


def test_standing_stats_make_eval_mode_match_train_mode():
    from gen_core.models import recalibrate_batchnorm

    torch.manual_seed(0)
    G = Generator(GeneratorSpec(16, 1, 10, 8, 8))
    with torch.no_grad():  # stale statistics, as an EMA copy would have
        for module in G.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.fill_(5.0)
    z, y = torch.randn(256, 8), torch.randint(0, 10, (256,))
    with torch.no_grad():
        train_out = G.train()(z, y)
        stale = G.eval()(z, y)
        recalibrate_batchnorm(G, num_batches=10, batch_size=128, seed=1)
        fresh = G(z, y)
    assert not G.training
    assert (fresh - train_out).abs().mean() < 0.1 < (stale - train_out).abs().mean()
    buffers = [b.clone() for b in G.buffers()]
    recalibrate_batchnorm(G, num_batches=10, batch_size=128, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(buffers, G.buffers()))  # seeded: reproducible


def test_sampling_builds_no_autograd_graph():
    """sample_gan runs under no_grad: evaluation and serving sample thousands of images, and a graph per batch would
    hold every activation (it once lost its decorator to a helper inserted above it)."""
    G = Generator(GeneratorSpec(resolution=32, channels=1, num_classes=10, z_dim=16, width=8))
    images = sample_gan(G, torch.tensor([1, 2]), [0, 1])
    assert not images.requires_grad and images.grad_fn is None
