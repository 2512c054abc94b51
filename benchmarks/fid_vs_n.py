"""How FID depends on the number of generated samples, measured on real data, and how well the extrapolation in
1/N that `evaluate` reports (`gen_core.metrics.fid_extrapolated`, Chong & Forsyth 2020) predicts FID at more
samples than it was fitted on.

Real *training* images stand in for a perfect generator: their features are computed once with the product's
Inception path (fp32, clean resize; the same network and backend as `ref_stats`) and cached in --cache, then
compared against the project's reference statistics (data/ref_stats/<protocol>/inception.npz):
- FID at each N in --sizes, averaged over --draws random subsets of the cached features (all of them at the largest);
- for each count in --fit-on, what `evaluate` reports from that many samples (gen_core.metrics.fid_extrapolated), on
  each disjoint block of `count` cached features, and the FID its fit predicts at each larger measured size, against
  the measurement.

    python benchmarks/fid_vs_n.py --upstream . --count 20000 --cache /tmp/train20k.npz --out benchmarks/fid_vs_n.json

Run it in a project whose `prepare` and `ref_stats` (standard protocol) stages have run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gen_core.config import InceptionConfig  # noqa: E402
from gen_core.data import load_split  # noqa: E402
from gen_core.metrics import fid_curve, fid_extrapolated, fid_from_features, inception_stats, load_inception, load_ref_stats  # noqa: E402


def cached_features(upstream: Path, count: int, cache: Path, batch_size: int, seed: int) -> np.ndarray:
    """Inception features of `count` training images drawn without replacement (seeded), computed once."""
    if cache.exists():
        features = np.load(cache)["features"]
        if len(features) >= count:
            return features[:count]
    train = load_split(str(upstream / "data/prepared"), "train")
    if count > len(train.labels):
        sys.exit(f"--count {count}: the prepared train split has {len(train.labels)} images")
    pick = np.random.default_rng(seed).permutation(len(train.labels))[:count]
    net = load_inception(InceptionConfig(batch_size=batch_size), precision="fp32")
    print(f"Inception features of {count} training images ({net.precision}, {net.backend})", flush=True)

    def progress(done: int, total: int, rate: float) -> None:
        print(f"  {done}/{total} images, {rate:.1f} img/s", flush=True)

    _, features = inception_stats(net, torch.from_numpy(train.images[pick]), batch_size, progress)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, features=features, indices=pick)
    tmp.replace(cache)
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", type=Path, default=Path("."), help="project with data/prepared and data/ref_stats")
    parser.add_argument("--protocol", default="standard")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=InceptionConfig().batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features-only", action="store_true", help="compute and cache the features, then stop")
    parser.add_argument("--sizes", default="1000,2000,3000,4000,5000,6000,7000,8000,9000,10000,12500,15000,17500,20000")
    parser.add_argument("--draws", type=int, default=4, help="random subsets averaged per measured size")
    parser.add_argument("--fit-on", default="10000", help="sample counts the product's extrapolation is run from")
    parser.add_argument("--target", type=int, default=50000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    started = time.monotonic()
    features = cached_features(args.upstream, args.count, args.cache, args.batch_size, args.seed)
    print(f"features: {features.shape} ({time.monotonic() - started:.0f} s)", flush=True)
    if args.features_only:
        return
    reference = load_ref_stats(args.upstream / f"data/ref_stats/{args.protocol}/inception.npz")
    sizes = [int(s) for s in args.sizes.split(",") if int(s) <= len(features)]
    curve = dict(fid_curve(features, reference["mu"], reference["sigma"], sizes, args.draws, args.seed))
    print("measured (mean of %d random subsets per size; all %d at the largest):" % (args.draws, len(features)))
    for n, fid in curve.items():
        print(f"  N={n:>6}  FID {fid:.3f}")
    fits = []
    for count in (int(c) for c in args.fit_on.split(",")):
        # what `evaluate` reports from `count` samples, on each disjoint block of `count` cached features (random draws)
        for start in range(0, len(features) - count + 1, count):
            block = features[start : start + count]
            began = time.monotonic()
            fit = fid_extrapolated(block, reference["mu"], reference["sigma"], args.target)
            seconds = time.monotonic() - began
            predicted = {n: fit["fid_infinity"] + fit["fid_extrapolation_slope"] / n for n in curve if n > count}
            fits.append({"samples": count, "block": [start, start + count], "seconds": round(seconds, 1),
                         "fid_measured_on_these": round(fid_from_features(block, reference["mu"], reference["sigma"]), 4),
                         "fid_infinity": round(fit["fid_infinity"], 4), "slope": round(fit["fid_extrapolation_slope"], 1),
                         "fid_extrapolated": round(fit["fid_extrapolated"], 4), "target": args.target,
                         "predicted_vs_measured": [{"n": n, "predicted": round(p, 4), "measured": round(curve[n], 4)} for n, p in predicted.items()]})  # fmt: skip
            f = fits[-1]
            print(f"features {start}-{start + count} ({seconds:.0f} s): FID {f['fid_measured_on_these']:.3f}; fit {f['fid_infinity']:.3f} + "
                  f"{f['slope']:.0f} / N; at {args.target}: {f['fid_extrapolated']:.3f}")  # fmt: skip
            for row in f["predicted_vs_measured"]:
                print(f"  N={row['n']:>6}  predicted {row['predicted']:.3f}  measured {row['measured']:.3f}  ({row['predicted'] - row['measured']:+.3f})")
    result = {"protocol": args.protocol, "reference": f"data/ref_stats/{args.protocol}/inception.npz",
              "features": f"{len(features)} training images (seeded draw {args.seed}), Inception fp32, clean resize", "draws": args.draws,
              "measured": [{"n": n, "fid": round(f, 4)} for n, f in curve.items()], "extrapolations": fits}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
