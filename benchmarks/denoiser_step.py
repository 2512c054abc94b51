"""Denoiser backbones side by side: training-step and sampling throughput, parameters and activation memory.

Each variant is `ldm.denoiser` of params.yaml with a backbone and preset (unet-s is the default's U-Net, dit-s/m/l the
DiT presets, dit-s-p2 on 2x2 patches) on the default's latents (4 x 8 x 8) and global batch. A training step is the train_ldm loop's: the
default's diffusion_loss (epsilon, min-SNR-5, label dropout) under the loop's context (bf16 autocast where native, math attention),
backward, AdamW. Sampling is DPM-Solver++ 10 steps at guidance 8 (two network calls a step), as evaluate runs it.
Variants alternate within each round; the median of the rounds is reported. 2 threads, as a 1-worker run of the
stage gets on this machine. Memory: the bytes autograd saves for backward in one training step (activations), and
parameters + AdamW state (fp32).

    python benchmarks/denoiser_step.py [--rounds 3] [--steps 10] [--variants unet-s,dit-s,dit-s-p2,dit-m]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.suite_profile import cpu_model  # noqa: E402

from gen_core.config import DenoiserConfig, load_config  # noqa: E402
from gen_core.diffusion import build_denoiser, diffusion_loss, sample_diffusion, training_schedule  # noqa: E402
from gen_core.training import autocast_dtype, training_compute  # noqa: E402

LATENT = (4, 8, 8)
NUM_CLASSES = 10


def denoiser_config(variant: str) -> DenoiserConfig:
    """unet-s -> the U-Net preset s; dit-m -> the DiT preset m; dit-s-p2 -> preset s on 2x2 patches."""
    backbone, preset, *patch = variant.split("-")
    if backbone == "unet":
        return DenoiserConfig(preset=preset)
    return DenoiserConfig(backbone="dit", dit={"preset": preset, "patch_size": int(patch[0][1:]) if patch else 1})


def train_steps_per_s(net, optimizer, schedule, batch, labels, steps: int, amp, min_snr_gamma) -> float:
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(steps):
        with training_compute(torch.device("cpu"), amp):  # the training loops' forward context
            loss = diffusion_loss(net, schedule, batch, labels, NUM_CLASSES, 0.1, generator, min_snr_gamma).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - started)


def sample_images_per_s(net, schedule_config, images: int, amp) -> float:
    started = time.perf_counter()
    labels = torch.arange(images) % NUM_CLASSES
    sample_diffusion(net.eval(), schedule_config, labels, range(images), LATENT, NUM_CLASSES, "dpmsolver++", 10, 8.0, "cpu", amp)
    net.train()
    return images / (time.perf_counter() - started)


def activation_bytes(net, schedule, batch, labels, amp, min_snr_gamma) -> int:
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with training_compute(torch.device("cpu"), amp):  # the training loops' forward context
            loss = diffusion_loss(net, schedule, batch, labels, NUM_CLASSES, 0.1, torch.Generator().manual_seed(0), min_snr_gamma).mean()
    loss.backward()
    return sum(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sample-images", type=int, default=100)
    parser.add_argument("--variants", default="unet-s,dit-s,dit-m")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(REPO / "params.yaml")
    d = cfg.ldm
    schedule = training_schedule(d.noise)
    amp = autocast_dtype(d.precision, torch.device("cpu"))
    batch = torch.randn(d.global_batch_size, *LATENT, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(d.global_batch_size) % NUM_CLASSES
    variants = args.variants.split(",")
    nets, optimizers = {}, {}
    for variant in variants:
        torch.manual_seed(0)
        nets[variant] = build_denoiser(denoiser_config(variant), LATENT[0], LATENT[1], NUM_CLASSES)
        optimizers[variant] = torch.optim.AdamW(nets[variant].parameters(), lr=d.lr)
        train_steps_per_s(nets[variant], optimizers[variant], schedule, batch, labels, 2, amp, d.min_snr_gamma)  # warm-up
    train = {v: [] for v in variants}
    sample = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            train[variant].append(train_steps_per_s(nets[variant], optimizers[variant], schedule, batch, labels, args.steps, amp, d.min_snr_gamma) * len(batch))
            sample[variant].append(sample_images_per_s(nets[variant], dict(schedule.config), args.sample_images, amp))
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores {cpu_model()}, torch {torch.__version__}, "
          f"{'bf16' if amp else 'fp32'}, global batch {len(batch)}, {args.rounds} rounds x {args.steps} steps, {args.sample_images} samples")
    base = statistics.median(train[variants[0]])
    for variant in variants:
        net = nets[variant]
        parameters = sum(p.numel() for p in net.parameters())
        activations = activation_bytes(net, schedule, batch, labels, amp, d.min_snr_gamma)
        median = statistics.median(train[variant])
        print(f"{variant:8s} {parameters:>11,d} params  train {median:6.1f} img/s ({median / base:.2f}x {variants[0]}; rounds "
              f"{', '.join(f'{v:.1f}' for v in train[variant])})  sample {statistics.median(sample[variant]):6.1f} img/s  "
              f"activations {activations / 2**20:6.1f} MiB  params+AdamW {parameters * 12 / 2**20:5.1f} MiB")


if __name__ == "__main__":
    main()
