"""gen_core.pix2pix: generator shapes and range, the PatchGAN's receptive field (the paper's 70x70 at 256), finite losses
that train: on real Fashion-MNIST edge -> garment pairs, a few steps lower the L1 to the targets."""

import numpy as np
import pytest
import torch

from gen_core.data import DEFAULT_SOURCE_URIS, FASHION_MNIST_CLASSES, read_idx_dataset
from gen_core.paired import edges
from gen_core.pix2pix import UNetGenerator, build_patch_discriminator, patch_layers, pix2pix_d_loss, pix2pix_g_loss, receptive_field


def test_the_discriminator_field_is_the_papers_scaled_to_the_image():
    assert [receptive_field(layers) for layers in (1, 2, 3)] == [16, 34, 70]  # 3 layers: the paper's 70x70
    assert patch_layers(256) == 3 and patch_layers(32) == 1 and patch_layers(128) == 2
    D = build_patch_discriminator(1, 1, 32)
    assert D(torch.zeros(2, 2, 32, 32)).shape == (2, 1, 14, 14)  # overlapping 16x16 patches


@pytest.mark.parametrize("levels", [1, 3])
def test_the_generator_maps_a_to_b_at_any_depth(levels):
    torch.manual_seed(0)
    G = UNetGenerator(1, 3, width=8, levels=levels)
    out = G(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    with pytest.raises(ValueError, match=r"image side 28 must be divisible by 2\*\*levels = 8"):
        UNetGenerator(1, 1, levels=3)(torch.zeros(1, 1, 28, 28))


def test_losses_train_edges_into_garments():
    raw = read_idx_dataset(DEFAULT_SOURCE_URIS["fashion_mnist"], FASHION_MNIST_CLASSES)
    garments = np.pad(raw.eval.images[:32].transpose(0, 3, 1, 2), ((0, 0), (0, 0), (2, 2), (2, 2)))  # 28 -> 32, as prepare does
    b = torch.from_numpy(garments).float() / 127.5 - 1
    a = torch.from_numpy(edges(garments)) * 2 - 1
    torch.manual_seed(0)
    G, D = UNetGenerator(1, 1, width=16), build_patch_discriminator(1, 1, 32, width=16)
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 2e-3, betas=(0.5, 0.999)), torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    l1 = []
    for _ in range(30):
        d_loss = pix2pix_d_loss(G, D, a, b)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss, parts = pix2pix_g_loss(G, D, a, b)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        assert torch.isfinite(d_loss) and torch.isfinite(g_loss)
        l1.append(parts["l1"].item())
    assert l1[-1] < 0.6 * l1[0], l1  # the translation learns the targets
