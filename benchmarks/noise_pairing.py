"""Minibatch noise pairing (Li et al. 2024, "Immiscible Diffusion"): does giving each training latent the batch's noise
draw nearest to it, by a linear assignment on squared distances, train the denoiser to a better FID in the same steps?

    python benchmarks/noise_pairing.py --set ldm.run_name=paired --set outputs.ldm.out_dir=models/ldm-paired \
        --set outputs.ldm.losses_file=metrics/ldm-paired_losses.csv --set outputs.ldm.eval_file=metrics/ldm-paired_eval.csv

runs the train_ldm stage in this process (params' `ray.in_process`: one worker, the product's own loop) with
gen_core.diffusion.diffusion_loss's noise draw permuted across the batch so that sum_i |x0_i - noise_pi(i)|^2 is least;
the timesteps and label drops are the product's, so a run with the same seed differs from the product's only in which
sample gets which noise. Run it in a project after `make repro` (it reads params.yaml and the latents there); give it
its own run_name, or it resumes the product's finished run. The pairing is not a product option: measured first
(RESULTS.md, session 69). Its export is then measured like any other, e.g.

    python benchmarks/ldm_samplers.py --model models/ldm-paired --upstream . --guidance 3 --samplers dpmsolver++:10
"""

from __future__ import annotations

import contextlib
import sys

import torch
from scipy.optimize import linear_sum_assignment

import gen_core.diffusion
import pipelines.train_ldm


def pairing(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The permutation of `noise` (N, ...) that minimises the summed squared distance to `x0` (N, ...): row i of the
    result is the noise draw assigned to x0[i]. (N,) indices"""
    cost = torch.cdist(x0.detach().flatten(1).double().cpu(), noise.flatten(1).double().cpu()).square()
    rows, columns = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(columns[rows.argsort()])


@contextlib.contextmanager
def paired_noise(x0: torch.Tensor):
    """Within the block, torch.randn of x0's shape (diffusion_loss's one noise draw) comes back paired to x0."""
    randn = torch.randn

    def paired_randn(*args, **kwargs):
        noise = randn(*args, **kwargs)
        return noise[pairing(x0, noise)] if noise.shape == x0.shape else noise

    torch.randn = paired_randn
    try:
        yield
    finally:
        torch.randn = randn


def paired_diffusion_loss(unet, schedule, x0, *args, **kwargs):
    with paired_noise(x0):
        return diffusion_loss(unet, schedule, x0, *args, **kwargs)


diffusion_loss = gen_core.diffusion.diffusion_loss

if __name__ == "__main__":
    pipelines.train_ldm.diffusion_loss = paired_diffusion_loss  # the name train_ldm's loop calls
    sys.argv[0] = "pipelines.train_ldm"
    pipelines.train_ldm.main()
