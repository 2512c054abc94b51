"""GAN generator latency, torch eager vs ONNX Runtime, side by side in one run: p50 / p90 milliseconds per call
at batch 1 and batch 64 (images per second too), on N CPU threads, for the params file's GAN (untrained
weights: latency does not depend on their values) or an exported generator directory.

    python benchmarks/serving_latency.py [--params params.yaml] [--model models/gan] [--threads 2] [--calls 200]

Each call is what serving does per request: seeded latents for the given seeds, then the network, then clamp.
Goal (issue "Serving the champion"): ONNX Runtime at least 1.5x torch eager at batch 1, p50 under 10 ms for one image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gen_core.checkpoint import load_generator  # noqa: E402
from gen_core.config import load_config  # noqa: E402
from gen_core.generators import GanGenerator  # noqa: E402
from gen_core.models import build_generator, gan_specs  # noqa: E402
from gen_core.onnx_gan import OnnxGanGenerator, export_gan_onnx  # noqa: E402


def latencies(generator, batch: int, calls: int) -> list[float]:
    labels = torch.arange(batch) % generator.num_classes
    generator.sample(labels, list(range(batch)))  # warm-up: kernel selection, allocations
    out = []
    for call in range(calls):
        seeds = list(range(call * batch, (call + 1) * batch))
        started = time.perf_counter()
        with torch.no_grad():
            generator.sample(labels, seeds)
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--model", help="an exported GAN generator directory (default: the params' GAN, untrained)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="calls at batch 1 (a tenth of them at batch 64)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "serving_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        generator, _ = load_generator(args.model)
    else:
        cfg = load_config(args.params)
        torch.manual_seed(0)
        generator = build_generator(gan_specs(cfg.gan.model, cfg.data.resolution, cfg.data.channels, 10)[0]).eval()
    spec = generator.spec
    with tempfile.TemporaryDirectory() as tmp:
        export_gan_onnx(generator, Path(tmp) / "generator.onnx")
        paths = {"torch eager": GanGenerator(generator), "onnxruntime": OnnxGanGenerator(Path(tmp) / "generator.onnx", spec.z_dim, spec.num_classes, args.threads)}
        rows = {}
        for batch, calls in ((1, args.calls), (64, max(args.calls // 10, 5))):
            for name, path in paths.items():
                ms = latencies(path, batch, calls)
                rows[f"{name}, batch {batch}"] = {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                                                  "img_per_s": batch * 1000 / float(np.median(ms)), "calls": calls}  # fmt: skip
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, GAN {spec.arch} width "
          f"{spec.width} z {spec.z_dim} at {spec.resolution}x{spec.resolution}x{spec.channels} ({sum(p.numel() for p in generator.parameters()):,} parameters)")  # fmt: skip
    print("| path, batch | p50 ms | p90 ms | img/s (at p50) |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['img_per_s']:.0f} |")
    for batch in (1, 64):
        speedup = rows[f"torch eager, batch {batch}"]["p50_ms"] / rows[f"onnxruntime, batch {batch}"]["p50_ms"]
        print(f"batch {batch}: ONNX Runtime {speedup:.2f}x torch eager (p50)")
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
              "generator": spec.to_dict(), "model": args.model, "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
