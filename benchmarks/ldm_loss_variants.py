"""The denoiser's training loss varied before it becomes an option: the train_ldm stage, in this process, with
gen_core.diffusion.diffusion_loss's random draws changed by one VARIANT:

- `pairing`: minibatch noise pairing (Li et al. 2024, "Immiscible Diffusion"): the batch's noise draws permuted so
  that sum_i |x0_i - noise_pi(i)|^2 is least (a linear assignment); timesteps and label drops are the product's, so a
  run with the same seed differs from the product's only in which sample gets which noise.
- `logit-normal:M:S`: timesteps t = (T - 1) sigmoid(M + S z), z ~ N(0, 1) (Esser et al. 2024's density) instead of
  uniform over 0..T-1: more of the steps in the middle of the schedule, where a garment's shape is settled.

    python benchmarks/ldm_loss_variants.py pairing --set ldm.run_name=paired --set outputs.ldm.out_dir=models/ldm-paired \
        --set outputs.ldm.losses_file=metrics/ldm-paired_losses.csv --set outputs.ldm.eval_file=metrics/ldm-paired_eval.csv

Run it in a project after `make repro` (it reads params.yaml and the latents there), with params' `ray.in_process`
(one worker: the product's own loop in this process), and give the run its own run_name, or it resumes the product's
finished run. Its export is then measured like any other (RESULTS.md, session 69), e.g.

    python benchmarks/ldm_samplers.py --model models/ldm-paired --upstream . --guidance 3 --samplers dpmsolver++:10
"""

from __future__ import annotations

import contextlib
import runpy
import sys

import torch
from scipy.optimize import linear_sum_assignment

import gen_core.diffusion


def pairing(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The permutation of `noise` (N, ...) that minimises the summed squared distance to `x0` (N, ...): row i of the
    result is the noise draw assigned to x0[i]. (N,) indices"""
    cost = torch.cdist(x0.detach().flatten(1).double().cpu(), noise.flatten(1).double().cpu()).square()
    rows, columns = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(columns[rows.argsort()])


@contextlib.contextmanager
def patched(name: str, replacement):
    """torch.<name> is `replacement(original)` within the block (diffusion_loss draws through torch.randn/randint)."""
    original = getattr(torch, name)
    setattr(torch, name, replacement(original))
    try:
        yield
    finally:
        setattr(torch, name, original)


def paired_noise(x0: torch.Tensor):
    """torch.randn of x0's shape (diffusion_loss's one noise draw) comes back paired to x0."""
    def replacement(randn):
        def paired_randn(*args, **kwargs):
            noise = randn(*args, **kwargs)
            return noise[pairing(x0, noise)] if noise.shape == x0.shape else noise
        return paired_randn
    return patched("randn", replacement)


def logit_normal_timesteps(mean: float, std: float):
    """torch.randint(0, T, (n,), generator=g) (diffusion_loss's timestep draw) comes back logit-normal over 0..T-1."""
    def replacement(randint):
        def logit_normal(low, high, size, generator=None, **kwargs):
            z = torch.randn(size, generator=generator) * std + mean
            return (torch.sigmoid(z) * (high - 1 - low) + low).round().long()
        return logit_normal
    return patched("randint", replacement)


def variant_loss(variant: str):
    """diffusion_loss with VARIANT's draws (module docstring)."""
    name, *args = variant.split(":")
    if name == "pairing" and not args:
        draws = paired_noise
    elif name == "logit-normal" and len(args) == 2:
        draws = lambda x0: logit_normal_timesteps(float(args[0]), float(args[1]))  # noqa: E731
    else:
        raise SystemExit(f"ldm_loss_variants: unknown variant {variant!r} (pairing | logit-normal:M:S)")
    product_loss = gen_core.diffusion.diffusion_loss

    def loss(unet, schedule, x0, *rest, **kwargs):
        with draws(x0):
            return product_loss(unet, schedule, x0, *rest, **kwargs)
    return loss


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    gen_core.diffusion.diffusion_loss = variant_loss(sys.argv.pop(1))  # before the stage imports it by name
    sys.argv[0] = "pipelines.train_ldm"
    runpy.run_module("pipelines.train_ldm", run_name="__main__", alter_sys=True)  # a stage is a leaf: run, not imported
