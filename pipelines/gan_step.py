"""The GAN's optimisation step under any strategy (DDP, FSDP2, DeepSpeed ZeRO), shared by the
train_gan loop, the strategy equivalence tests and benchmarks/strategies.py."""

from __future__ import annotations

import torch

from gen_core.losses import discriminator_loss, generator_loss
from pipelines.strategy import Part


def gan_step(G: Part, D: Part, real: torch.Tensor, labels: torch.Tensor, noise: torch.Generator, z_dim: int, loss: str,
             d_steps: int, autocast) -> dict[str, torch.Tensor]:  # fmt: skip
    """One G step after `d_steps` D steps on this rank's share of the batch, under any strategy.
    real (n, C, R, R) in [-1, 1], labels (n,). -> {"d_loss", "g_loss"} (this rank's means).
    `autocast` is a context-manager factory."""
    n, device = len(labels), real.device
    for _ in range(d_steps):
        # D step: fakes from G's plain forward under no_grad (no G gradients, nothing to sync)
        z = torch.randn(n, z_dim, generator=noise).to(device)
        with torch.no_grad(), autocast():
            fake = G.module(z, labels)
        with autocast():
            d_loss = discriminator_loss(loss, D.forward, real, fake, labels).mean()
        D.backward(d_loss)
        D.step()
    # G step: D frozen and called as its plain module, so only G's gradients are reduced. Under
    # DeepSpeed this is required, not an optimisation: with D not frozen ZeRO-1 updates wrongly without
    # a word and ZeRO-2/3 assert (docs/stack.md, "DeepSpeed and the GAN")
    z = torch.randn(n, z_dim, generator=noise).to(device)
    with D.frozen() as frozen_D, autocast():
        g_loss = generator_loss(loss, frozen_D, G.forward(z, labels), labels).mean()
    G.backward(g_loss)
    G.step()
    return {"d_loss": d_loss, "g_loss": g_loss}
