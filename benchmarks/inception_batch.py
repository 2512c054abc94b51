"""Inception feature extraction at several batch sizes, side by side in one process: img/s end to end (the batched
resize + the network, `gen_core.metrics.inception_stats` as ref_stats and the autoencoder's reconstruction FID run
it) and whether the features are bitwise those of the first batch size. Random uint8 28x28 images (the network sees
299x299 whatever their content); batch sizes alternate within each round, the median of the rounds is reported.

    python benchmarks/inception_batch.py [--precision bf16] [--images 200] [--batches 50,25,10] [--rounds 3]

precision bf16 runs torch under bf16 autocast where native (the `quick` protocol), fp32 ONNX Runtime on a CPU (`standard`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.suite_profile import cpu_model  # noqa: E402

from gen_core.config import InceptionConfig  # noqa: E402
from gen_core.metrics import inception_stats, load_inception  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batches", default="50,25,10")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = load_inception(InceptionConfig(), "cpu", args.precision)
    images = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batches = [int(b) for b in args.batches.split(",")]
    inception_stats(net, images[: batches[0]], batches[0])  # warm-up
    rates: dict[int, list[float]] = {b: [] for b in batches}
    features: dict[int, np.ndarray] = {}
    for _ in range(args.rounds):
        for batch in batches:
            started = time.perf_counter()
            _, features[batch] = inception_stats(net, images, batch)
            rates[batch].append(args.images / (time.perf_counter() - started))
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores {cpu_model()}, torch {torch.__version__}, {args.threads} threads, "
          f"Inception {net.precision} ({net.backend}), {args.images} images, {args.rounds} rounds")
    print(f"| batch | img/s (median) | vs {batches[0]} | rounds | features equal to batch {batches[0]}'s |\n|---|---|---|---|---|")
    base = statistics.median(rates[batches[0]])
    for batch in batches:
        median = statistics.median(rates[batch])
        same = np.array_equal(features[batch], features[batches[0]])
        print(f"| {batch} | {median:.1f} | {median / base:.2f}x | {', '.join(f'{v:.1f}' for v in rates[batch])} | "
              f"{'bitwise' if same else f'max diff {np.abs(features[batch] - features[batches[0]]).max():.2e}'} |")


if __name__ == "__main__":
    main()
