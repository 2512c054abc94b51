"""Pure helpers for training loops: seeded data order, per-step noise, precision, CPU kernels."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def batch_indices(step: int, global_batch_size: int, dataset_size: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of this rank's share of global batch `step`.

    The data order is a seeded permutation per epoch, so batch `step` is a pure function of
    (step, seed): a resumed run sees exactly the data it would have seen, and the global batch
    is the same whatever the world size (rank r takes positions r, r + W, ...).
    """
    start = step * global_batch_size
    positions = torch.arange(start, start + global_batch_size)[rank::world_size]
    epochs = positions // dataset_size
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        mask = epochs == epoch
        out[mask] = perm[positions[mask] % dataset_size]
    return out


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for the training noise of one (step, rank): resume-exact without saving RNG streams."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator(device=device).manual_seed(key)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. `auto` picks bf16 only where the hardware runs it natively."""
    if precision == "fp32":
        return None
    if precision == "bf16" or bf16_supported(device):
        return torch.bfloat16
    return None


def training_compute(device: torch.device, dtype: torch.dtype | None) -> contextlib.ExitStack:
    """The context of a training forward: autocast to `dtype` (None: fp32) and, on a CPU, attention through the
    math kernel (softmax(QK^T)V as matrix products) rather than the CPU flash kernel, whose backward took 23% of a
    latent denoiser's step for 16-token attention: on 2 cores the default U-Net's step is 1.29x faster with the math
    kernel, U-Net m's 1.41x, DiT s's 1.44x, the LPIPS autoencoder's 1.02x (benchmarks/cpu_training.py, RESULTS.md).
    Sampling keeps the default kernel, as fast or faster there. The backward follows the kernel its forward chose,
    so the context need not cover `backward()`."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def config_signature(obj: dict) -> str:
    """Stable short hash of a JSON-able dict (what a checkpoint must match to be resumed)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cooldown(step: int, total_steps: int, fraction: float) -> float:
    """The learning-rate multiplier at `step` (0-based) of a warmup-stable-decay schedule without the warmup: 1,
    then over the last `fraction` of total_steps a half cosine towards 0 (reached after the last step) (Hägele et al. 2024,
    "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations": a short cooldown matches a whole-run
    cosine and keeps the run extendable). The schedule follows total_steps, so a run resumed past its old end
    (total_steps raised) trains at the full rate again until the new cooldown. 0: constant."""
    start = total_steps * (1.0 - fraction)
    if fraction <= 0 or step < start:
        return 1.0
    progress = (step - start) / (total_steps - start)
    return 0.5 + 0.5 * math.cos(math.pi * progress)


def ramp(start_ratio: float, images_seen: int, ramp_kimg: float | None) -> float:
    """A multiplier that rises (or falls) from `start_ratio` to 1 along a half cosine over the first `ramp_kimg`
    thousand images, then stays 1 (R3GAN's schedules for rates and penalties). No ramp: 1."""
    if ramp_kimg is None or start_ratio == 1.0:
        return 1.0
    progress = min(images_seen / (ramp_kimg * 1000), 1.0)
    return start_ratio + (1.0 - start_ratio) * (0.5 - 0.5 * math.cos(math.pi * progress))
