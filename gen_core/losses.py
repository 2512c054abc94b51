"""GAN objectives: small callables that take the networks and the data and return per-sample losses.
The training step does the reduction.

An objective (GanObjective) is a loss pairing plus optional gradient penalties and DiffAugment:

- `hinge`, `nonsaturating`: the classic pairings (D(real) and D(fake) judged separately);
- `wgan`: the Wasserstein critic, D(fake) - D(real); with `gp_lambda` it is WGAN-GP (Gulrajani et al. 2017):
  lambda * (|grad D(x_hat)| - 1)^2 on random interpolates x_hat of real and fake;
- `rpgan`: the relativistic pairing loss (Jolicoeur-Martineau 2018) that R3GAN (Huang et al. 2024) pairs with
  R1 + R2: softplus(D(fake) - D(real)) for D, the mirror for G; real i is paired with fake i;
- `r1_gamma`, `r2_gamma`: zero-centred gradient penalties gamma/2 |grad D|^2 on reals (R1, Mescheder et al.
  2018) and on fakes (R2). With `interval` k > 1 they are applied every k-th D step with weight k (StyleGAN2's
  lazy regularisation; the D optimizer's rate and betas are scaled by k/(k+1): `d_optimizer_scale`).

Every D evaluation of a step is one forward over the concatenation of real, fake (and interpolates):
DDP allows one forward per backward, and the spectral norm does one power iteration per forward, so the
loss is the same as separate calls only this way. Gradient penalties take d D / d input with
create_graph=True through that forward (the penalty's own backward is a double backward through D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from gen_core.augment import diff_augment

LossKind = Literal["nonsaturating", "hinge", "wgan", "rpgan"]
LOSS_KINDS: tuple[str, ...] = ("nonsaturating", "hinge", "wgan", "rpgan")


@dataclass(frozen=True)
class GanObjective:
    """What the D and G losses compute. Built from the `gan` params section (GanConfig.objective())."""

    loss: LossKind = "hinge"
    r1_gamma: float = 0.0
    r2_gamma: float = 0.0
    gp_lambda: float = 0.0
    interval: int = 1  # lazy regularisation: penalties every `interval`-th D step, weighted by it
    augment: tuple[str, ...] = ()  # DiffAugment policy, e.g. ("color", "translation", "cutout")

    def __post_init__(self):
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {', '.join(LOSS_KINDS)} (got {self.loss!r})")
        if self.gp_lambda and self.loss != "wgan":
            raise ValueError(f"gp_lambda (WGAN-GP) goes with loss wgan, not {self.loss}; use r1_gamma/r2_gamma for zero-centred penalties")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1 (got {self.interval})")

    @property
    def penalised(self) -> bool:
        return bool(self.r1_gamma or self.r2_gamma or self.gp_lambda)

    def regularizes_at(self, d_step: int) -> bool:
        """Whether the D step with this running index (over the whole run) computes the penalties."""
        return self.penalised and d_step % self.interval == 0

    @property
    def d_optimizer_scale(self) -> float:
        """StyleGAN2's correction for lazy regularisation: D's learning rate x c and betas ** c, c = k / (k + 1)."""
        return self.interval / (self.interval + 1) if self.penalised and self.interval > 1 else 1.0


def discriminator_loss(objective: GanObjective, D, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor,
                       noise: torch.Generator | None = None, regularize: bool = False,
                       gamma_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Per-sample D loss (N,) and the penalties' batch means ({"r1", "r2", "gp"}, detached; only those computed).

    `fake` must already be detached by the caller. `noise` seeds DiffAugment and the interpolates (per step
    and rank, like the rest of the noise). `regularize`: add the penalties at this step (objective.regularizes_at);
    `gamma_scale` multiplies r1/r2 gamma (a schedule's ramp)."""
    n, o = len(real), objective
    r1r2 = regularize and bool(o.r1_gamma or o.r2_gamma)
    gp = regularize and bool(o.gp_lambda)
    x, y = torch.cat([real, fake]), torch.cat([labels, labels])
    if gp:
        eps = torch.rand(n, 1, 1, 1, generator=noise).to(real)
        # eps*real + (1-eps)*fake, in the reals' dtype as torch.cat gave x (under bf16 autocast G's fakes are bf16)
        x, y = torch.cat([x, torch.lerp(fake.to(real.dtype), real, eps)]), torch.cat([y, labels])
    if r1r2 or gp:
        x = x.detach().requires_grad_(True)
    logits = D(diff_augment(x, o.augment, noise), y).float()
    real_logits, fake_logits = logits[:n], logits[n : 2 * n]
    loss = _d_pairing(o.loss, real_logits, fake_logits)
    stats: dict[str, torch.Tensor] = {}
    if r1r2 or gp:
        # d(sum of logits)/d input: each sample's own gradient (D has no batch statistics; with minibatch-stddev
        # the group's cross-terms are included, as in StyleGAN2's R1)
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        squared = grad.float().square().flatten(1).sum(1)
        weight = o.interval
        if o.r1_gamma:
            stats["r1"] = squared[:n].detach().mean()
            loss = loss + weight * gamma_scale * o.r1_gamma / 2 * squared[:n]
        if o.r2_gamma:
            stats["r2"] = squared[n : 2 * n].detach().mean()
            loss = loss + weight * gamma_scale * o.r2_gamma / 2 * squared[n : 2 * n]
        if gp:
            penalty = (squared[2 * n :].add(1e-12).sqrt() - 1).square()
            stats["gp"] = penalty.detach().mean()
            loss = loss + weight * o.gp_lambda * penalty
    return loss, stats


def _d_pairing(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1.0 - real_logits) + F.relu(1.0 + fake_logits)
    if kind == "wgan":
        return fake_logits - real_logits
    if kind == "rpgan":
        return F.softplus(fake_logits - real_logits)  # -log sigmoid(D(real) - D(fake))
    return F.softplus(-real_logits) + F.softplus(fake_logits)  # -log sigmoid(r) - log(1 - sigmoid(f))


def generator_loss(objective: GanObjective, D, fake: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None,
                   noise: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Per-sample G loss (N,). Non-saturating: -log sigmoid(D(G(z))); hinge and wgan: -D(G(z));
    rpgan: softplus(D(real) - D(G(z))), which needs this step's `real` (detached; one forward with the fakes)."""
    o = objective
    if o.loss == "rpgan":
        if real is None:
            raise ValueError("loss rpgan: the G loss needs the real batch")
        n = len(fake)
        logits = D(diff_augment(torch.cat([real.detach(), fake]), o.augment, noise), torch.cat([labels, labels])).float()
        return F.softplus(logits[:n] - logits[n:])
    fake_logits = D(diff_augment(fake, o.augment, noise), labels).float()
    if o.loss in ("hinge", "wgan"):
        return -fake_logits
    return F.softplus(-fake_logits)


def gan_objective(section) -> GanObjective:
    """The objective of a `gan` params section (gen_core.config.GanConfig)."""
    r = section.regularization
    return GanObjective(section.loss, r.r1_gamma, r.r2_gamma, r.gp_lambda, r.interval, tuple(section.augment))
