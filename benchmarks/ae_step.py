"""Autoencoder training-step throughput (img/s) with and without the LPIPS term, side by side in one run.

Each variant is the train_autoencoder loop's step on the default params' autoencoder and global batch: the
AutoencoderRoundTrip forward under the loop's context (bf16 autocast where native, math attention), L1 + KL (+ LPIPS-VGG16 on
`perceptual_images` of the batch), backward, Adam. Variants alternate within each round; the median of the rounds
is reported. 2 threads, as a 1-worker run of the stage gets on this machine.

    python benchmarks/ae_step.py [--rounds 3] [--steps 10] [--variants plain,lpips-all,lpips-16]
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

from gen_core.config import load_config  # noqa: E402
from gen_core.diffusion import AutoencoderRoundTrip, autoencoder_loss, build_autoencoder  # noqa: E402
from gen_core.lpips import load_lpips  # noqa: E402
from gen_core.training import autocast_dtype, training_compute  # noqa: E402


def perceptual_images(variant: str, batch: int) -> int | None:
    """plain -> None (no LPIPS); lpips-all -> the batch; lpips-K -> K."""
    if variant == "plain":
        return None
    return batch if variant == "lpips-all" else int(variant.split("-")[1])


def steps_per_s(variant: str, steps: int, model, optimizer, lpips, batch: torch.Tensor, amp) -> float:
    k = perceptual_images(variant, len(batch))
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(steps):
        with training_compute(torch.device("cpu"), amp):  # the training loops' forward context
            loss, _ = autoencoder_loss(model, batch, "l1", 1e-6, generator, lpips if k else None, 1.0 if k else 0.0, k)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="plain,lpips-all,lpips-16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(REPO / "params.yaml")
    a = cfg.autoencoder
    torch.manual_seed(0)
    model = AutoencoderRoundTrip(build_autoencoder(a, cfg.data.channels))
    optimizer = torch.optim.Adam(model.parameters(), lr=a.lr)
    lpips = load_lpips()
    batch = torch.rand(a.global_batch_size, cfg.data.channels, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    amp = autocast_dtype(a.precision, torch.device("cpu"))
    variants = args.variants.split(",")
    for variant in variants:  # warm-up
        steps_per_s(variant, 2, model, optimizer, lpips, batch, amp)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            rates[variant].append(steps_per_s(variant, args.steps, model, optimizer, lpips, batch, amp) * len(batch))
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores {cpu_model()}, torch {torch.__version__}, "
          f"{'bf16' if amp else 'fp32'}, global batch {len(batch)}, {args.rounds} rounds x {args.steps} steps")
    base = statistics.median(rates[variants[0]])
    for variant, values in rates.items():
        median = statistics.median(values)
        print(f"{variant:10s} {median:7.1f} img/s  ({median / base:.2f}x {variants[0]}; rounds: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
