"""Why the test processes run one BLAS/OpenMP thread each: the same 2048-d Frechet distance
(gen_core.metrics.fid_from_stats, 100 vs 300 samples, twice) with 1 and 2 threads, on an idle machine
and beside one busy core (a pure-Python loop in another process, as a second pytest-xdist worker is),
alternating, in fresh processes (BLAS reads its thread count once).

`--wait-policy`: why they also run with OMP_WAIT_POLICY=PASSIVE. The evaluate stage sets its own torch thread
count (ray.num_workers x ray.cpus_per_worker, 2 in the tests' profile), so the one-thread default does not reach
it. What it runs, the Inception features of 60 images (bf16 where the CPU has it, as the quick protocol), with
2 torch threads beside a busy core, with libgomp's default wait policy (a thread that reaches the end of a
parallel region spins before it sleeps) and with PASSIVE (it sleeps at once).

    python benchmarks/oversubscription.py [--rounds 2] [--wait-policy]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import resource, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from gen_core.metrics import fid_from_stats
rng = np.random.default_rng(0)
mixing = rng.normal(size=(2048, 2048)) / 45
a, b = rng.normal(size=(100, 2048)) @ mixing, (rng.normal(size=(300, 2048)) + 0.1) @ mixing
stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(2):
    fid_from_stats(*stats[0], *stats[1])
after = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - started, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
"""


INCEPTION_CHILD = """
import resource, sys, time
import torch
sys.path.insert(0, {repo!r})
from gen_core.config import InceptionConfig
from gen_core.metrics import inception_features, load_inception
torch.set_num_threads(2)  # as the evaluate stage does
net = load_inception(InceptionConfig(), precision="bf16")
images = torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
inception_features(net, images[:2])  # warm-up
before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for batch in images.split(30):
    inception_features(net, batch)
after = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - started, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
"""


def run_child(source: str, env: dict) -> tuple[float, float]:
    """(wall s, CPU-s) that a fresh process running `source` (one of the CHILD programs) prints for its measured part."""
    out = subprocess.run([sys.executable, "-c", source.format(repo=str(REPO))], env=env, capture_output=True, text=True, check=True)
    wall, cpu = map(float, out.stdout.split())
    return wall, cpu


def measure_wait_policy(policy: str | None) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": policy} if policy else {})
    return run_child(INCEPTION_CHILD, env)


def measure(threads: int) -> tuple[float, float]:
    return run_child(CHILD, {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})


@contextlib.contextmanager
def busy_core(busy: bool = True):
    """A pure-Python loop in another process (as a second pytest-xdist worker is) while the block runs."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5)
        yield
    finally:
        if hog:
            hog.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--wait-policy", action="store_true", help="the evaluate stage's Inception features, 2 torch threads, by OMP_WAIT_POLICY")
    args = parser.parse_args()
    if args.wait_policy:
        print(f"{os.cpu_count()} cores; Inception features of 60 images, 2 torch threads, beside a busy core")
        print("| OMP_WAIT_POLICY | wall (s) | CPU-s |")
        print("|---|---|---|")
        with busy_core():
            for _ in range(args.rounds):
                for policy in (None, "PASSIVE"):
                    wall, cpu = measure_wait_policy(policy)
                    print(f"| {policy or '(unset)'} | {wall:.2f} | {cpu:.2f} |", flush=True)
        return
    print(f"{os.cpu_count()} cores; two 2048-d Frechet distances per measurement")
    print("| other core | BLAS threads | wall (s) | CPU-s |")
    print("|---|---|---|---|")
    for busy in (False, True):
        with busy_core(busy):
            for _ in range(args.rounds):
                for threads in (2, 1):
                    wall, cpu = measure(threads)
                    print(f"| {'busy' if busy else 'idle'} | {threads} | {wall:.2f} | {cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
