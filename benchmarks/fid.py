"""The Frechet distance of 2048-d Inception statistics: clean-fid's `frechet_distance` (scipy.linalg.sqrtm
of S1 S2) against gen_core.metrics.fid_from_stats (two symmetric eigendecompositions), side by side in
one run on the same statistics, with the values they give.

Statistics: correlated Gaussian features, two sample counts: fewer samples than dimensions (the
tests' and sweep trials' final FIDs, singular covariances) and more (the default profile's 1000-sample
evaluation against a 1000-image reference is still singular; 5000 is full rank).

    python benchmarks/fid.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (the evaluate stage runs in a 2-CPU driver by default)")
    return parser.parse_args()


if __name__ == "__main__":  # before numpy: BLAS reads its thread count once, at import
    ARGS = parse_args()
    threads = str(ARGS.threads)
    os.environ.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def stats(rng, samples: int, dim: int, mixing: np.ndarray, shift: float) -> tuple[np.ndarray, np.ndarray]:
    x = (rng.normal(size=(samples, dim)) + shift) @ mixing
    return x.mean(0), np.cov(x, rowvar=False)


def main(args: argparse.Namespace) -> None:
    from cleanfid.fid import frechet_distance

    from gen_core.metrics import fid_from_stats

    dim = 2048
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}, {args.threads} BLAS threads, {args.repeats} repeats (median)")
    print("| samples per side | clean-fid sqrtm (s) | eigh (s) | speed-up | clean-fid value | eigh value | relative difference |")
    print("|---|---|---|---|---|---|---|")
    for samples in (100, 5000):
        a, b = stats(rng, samples, dim, mixing, 0.0), stats(rng, samples, dim, mixing, 0.1)
        times = {"clean-fid": [], "eigh": []}
        for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
            started = time.perf_counter()
            theirs = float(frechet_distance(*a, *b))
            times["clean-fid"].append(time.perf_counter() - started)
            started = time.perf_counter()
            ours = fid_from_stats(*a, *b)
            times["eigh"].append(time.perf_counter() - started)
        slow, fast = (float(np.median(t)) for t in times.values())
        print(f"| {samples} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x | {theirs:.6f} | {ours:.6f} | {abs(ours - theirs) / theirs:.1e} |")


if __name__ == "__main__":
    main(ARGS)
