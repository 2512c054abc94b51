"""GAN losses: small callables that take the networks and the data and return per-sample losses.
The training step does the reduction."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["nonsaturating", "hinge"]


def discriminator_loss(kind: LossKind, D, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample D loss (N,). `fake` must already be detached by the caller.

    Real and fake go through D in one forward: DDP allows one forward per backward, and D has
    no batch statistics, so this is the same as two separate calls.
    """
    logits = D(torch.cat([real, fake]), torch.cat([labels, labels])).float()
    real_logits, fake_logits = logits.chunk(2)
    if kind == "hinge":
        return F.relu(1.0 - real_logits) + F.relu(1.0 + fake_logits)
    return F.softplus(-real_logits) + F.softplus(fake_logits)  # -log sigmoid(r) - log(1 - sigmoid(f))


def generator_loss(kind: LossKind, D, fake: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample G loss (N,). Non-saturating: -log sigmoid(D(G(z))); hinge: -D(G(z))."""
    fake_logits = D(fake, labels).float()
    if kind == "hinge":
        return -fake_logits
    return F.softplus(-fake_logits)
