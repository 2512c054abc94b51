"""gen_core.dit: the transformer denoiser. Shapes, adaLN-Zero's identity start, per-sample independence, the call
conventions the samplers and losses rely on, the config's presets and refusals, and run names."""

import pytest
import torch

from gen_core.config import ConfigError, DenoiserConfig, DitConfig, NoiseScheduleConfig, config_from_dict
from gen_core.diffusion import build_denoiser, diffusion_loss, training_schedule
from gen_core.dit import GenforgeDiT, sincos_positions

NUM_CLASSES = 10


def random_dit(**sizes) -> GenforgeDiT:
    """A DiT whose zero-initialised layers are random, so that every part of it shows in the output."""
    torch.manual_seed(0)
    net = GenforgeDiT(**{"sample_size": 8, "in_channels": 4, "num_class_embeds": NUM_CLASSES + 1, "hidden_size": 32, "num_layers": 2,
                         "num_heads": 2, **sizes})  # fmt: skip
    with torch.no_grad():
        for parameter in net.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    return net.eval()


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_shapes_and_an_untrained_dit_predicts_zero(patch_size):
    """adaLN-Zero: every block starts as the identity and the output layer at zero, so a fresh DiT predicts exactly 0."""
    net = GenforgeDiT(sample_size=8, in_channels=4, num_class_embeds=NUM_CLASSES + 1, patch_size=patch_size, hidden_size=32, num_layers=2, num_heads=2)
    x = torch.randn(3, 4, 8, 8)
    out = net(x, torch.tensor([1, 500, 999]), torch.tensor([0, 9, NUM_CLASSES]))[0]
    assert out.shape == x.shape and not out.any()
    assert random_dit(patch_size=patch_size)(x, 10, torch.tensor([0, 1, 2]))[0].abs().sum() > 0


def test_patches_go_back_where_they_came_from():
    """The output layer's token layout is the input's: a DiT whose blocks and modulation are off and whose output layer
    inverts the patch embedding returns its input, for patches of 2x2."""
    net = GenforgeDiT(sample_size=8, in_channels=4, num_class_embeds=3, patch_size=2, hidden_size=16, num_layers=1, num_heads=2)
    with torch.no_grad():
        net.patch_embed.weight.copy_(torch.eye(16).view(16, 4, 2, 2))  # token channel k = (c, y, x) of its patch, k = 4c + 2y + x
        net.patch_embed.bias.zero_()
        net.positions.zero_()
        # proj_out maps token channel k back to output position k: (p, p, C) order, as the unpatchify reads it
        order = torch.arange(16).view(4, 2, 2).permute(1, 2, 0).reshape(-1)
        net.proj_out.weight.copy_(torch.eye(16)[order])
    net.norm_out = torch.nn.Identity()
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(net(x, 0, torch.tensor([0, 1]))[0], x, atol=1e-6)


def test_each_sample_is_independent_of_the_batch_and_timesteps_broadcast():
    net = random_dit()
    x, labels, t = torch.randn(4, 4, 8, 8), torch.tensor([0, 3, 7, NUM_CLASSES]), torch.tensor([5, 5, 5, 5])
    together = net(x, t, labels)[0]
    alone = torch.cat([net(x[i : i + 1], t[i : i + 1], labels[i : i + 1])[0] for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.equal(net(x, torch.tensor(5), labels)[0], together) and torch.equal(net(x, 5, labels)[0], together)
    assert not torch.allclose(net(x, 5.5, labels)[0], together)  # fractional timesteps (Heun, EDM) are their own
    assert not torch.allclose(net(x, t, torch.tensor([1, 3, 7, NUM_CLASSES]))[0][0], together[0])  # the label matters
    with pytest.raises(IndexError):
        net(x[:1], 5, torch.tensor([NUM_CLASSES + 1]))  # beyond the null class


def test_positions_are_fixed_and_distinct():
    positions = sincos_positions(4, 16)
    assert positions.shape == (16, 16) and torch.cdist(positions, positions).add(torch.eye(16)).min() > 0.1


def test_the_dit_trains_through_the_diffusion_loss_in_bf16_autocast():
    cfg = DenoiserConfig(backbone="dit", dit={"hidden_size": 32, "num_layers": 2, "num_heads": 2})
    torch.manual_seed(0)
    net = build_denoiser(cfg, channels=4, sample_size=8, num_classes=NUM_CLASSES)
    schedule = training_schedule(NoiseScheduleConfig())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x0, labels = torch.randn(8, 4, 8, 8), torch.randint(0, NUM_CLASSES, (8,))
    losses = []
    for _ in range(5):  # the same noise each step: the loss must fall
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion_loss(net, schedule, x0, labels, NUM_CLASSES, 0.1, torch.Generator().manual_seed(0)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_presets_set_the_sizes_and_clashes_and_bad_sizes_are_refused():
    from gen_core.config import DIT_PRESETS

    counts = []
    for name in DIT_PRESETS:
        cfg = config_from_dict({"ldm": {"denoiser": {"backbone": "dit", "dit": {"preset": name}}}}).ldm.denoiser
        assert config_from_dict({"ldm": {"denoiser": cfg.model_dump()}}).ldm.denoiser == cfg  # as runs log it
        counts.append(sum(p.numel() for p in build_denoiser(cfg, 4, 8, NUM_CLASSES).parameters()))
    assert counts == [1_865_988, 9_736_196, 32_469_508]  # the README's table (4x8x8 latents, 10 classes)
    assert DitConfig() == DitConfig(preset="s").model_copy(update={"preset": None})  # params.yaml's sizes are s's
    assert DitConfig(preset="l").model_dump(include={"hidden_size", "num_layers", "num_heads"}) == {"hidden_size": 384, "num_layers": 12, "num_heads": 6}
    with pytest.raises(ValueError, match="preset m sets hidden_size: leave it out, or set preset: null"):
        DitConfig(preset="m", hidden_size=64)
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be a multiple of 4 and of num_heads \(4\)"):
        DitConfig(hidden_size=30)
    with pytest.raises(ConfigError, match=r"ldm.denoiser.dit.patch_size \(3\) must divide the denoiser's input size \(8x8\)"):
        config_from_dict({"ldm": {"denoiser": {"backbone": "dit", "dit": {"patch_size": 3}}}})
    config_from_dict({"ldm": {"space": "pixel", "denoiser": {"backbone": "dit", "dit": {"patch_size": 4}}}})  # 32x32 pixels


def test_the_backbone_choice_leaves_unet_run_names_alone_and_a_dit_run_ignores_unet_sizes():
    unet = config_from_dict({}).ldm.resume_signature()["denoiser"]
    assert set(unet) == {"preset", "block_out_channels", "layers_per_block", "attention_levels", "attention_head_dim"}  # as before the choice
    dit = config_from_dict({"ldm": {"denoiser": {"backbone": "dit"}}}).ldm.resume_signature()["denoiser"]
    wider_unet = config_from_dict({"ldm": {"denoiser": {"backbone": "dit", "block_out_channels": [96, 192]}}}).ldm.resume_signature()["denoiser"]
    deeper_dit = config_from_dict({"ldm": {"denoiser": {"backbone": "dit", "dit": {"num_layers": 7}}}}).ldm.resume_signature()["denoiser"]
    assert dit == wider_unet and dit != deeper_dit and dit["backbone"] == "dit"
