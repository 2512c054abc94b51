"""The Frechet distance of 2048-d Inception statistics: clean-fid's `frechet_distance` (scipy.linalg.sqrtm
of S1 S2) against gen_core.metrics.fid_from_stats (two symmetric d x d eigendecompositions) and
gen_core.metrics.fid_from_features (one n x n eigendecomposition from the generated set's features,
what sample_metrics and the sweep probe use), side by side in one run on the same data, with the
values they give.

Data: correlated Gaussian features, the generated side at three sample counts: fewer samples than
dimensions (the tests' and sweep trials' final FIDs), the `quick` protocol's 1,000 (still a singular
covariance) and 5,000 (full rank: fid_from_features is fid_from_stats there); the reference side
5,000 samples (full rank, as the 10,000-image test split is).

    python benchmarks/fid.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
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
from benchmarks.suite_profile import cpu_model  # noqa: E402


def features(rng, samples: int, dim: int, mixing: np.ndarray, shift: float) -> np.ndarray:
    return (rng.normal(size=(samples, dim)) + shift) @ mixing


def main(args: argparse.Namespace) -> None:
    from cleanfid.fid import frechet_distance

    from gen_core.metrics import fid_from_features, fid_from_stats

    dim = 2048
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    reference = features(rng, 5000, dim, mixing, 0.0)
    b = reference.mean(0), np.cov(reference, rowvar=False)
    print(f"{cpu_model()}, numpy {np.__version__}, {args.threads} BLAS threads, {args.repeats} repeats (median)")
    print("| generated samples | clean-fid sqrtm (s) | eigh d x d (s) | from features (s) | clean-fid value | eigh value | from-features value |")
    print("|---|---|---|---|---|---|---|")
    for samples in (100, 1000, 5000):
        x = features(rng, samples, dim, mixing, 0.1)
        a = x.mean(0), np.cov(x, rowvar=False)
        runs = {"clean-fid": lambda: float(frechet_distance(*a, *b)), "eigh": lambda: fid_from_stats(*a, *b), "features": lambda: fid_from_features(x, *b)}
        times, values = {name: [] for name in runs}, {}
        for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits all alike
            for name, run in runs.items():
                started = time.perf_counter()
                values[name] = run()
                times[name].append(time.perf_counter() - started)
        t = {name: float(np.median(v)) for name, v in times.items()}
        print(f"| {samples} | {t['clean-fid']:.2f} | {t['eigh']:.2f} | {t['features']:.2f} | {values['clean-fid']:.6f} | {values['eigh']:.6f} | {values['features']:.6f} |")


if __name__ == "__main__":
    main(ARGS)
