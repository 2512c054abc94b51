"""Generator latency, torch eager vs ONNX Runtime, side by side in one run: p50 / p90 milliseconds per call
at batch 1 and batch 64 (images per second too), on N CPU threads, for the params file's model of the family
(untrained weights: latency does not depend on their values) or an exported model directory.

    python benchmarks/serving_latency.py [--family gan|ldm] [--params params.yaml] [--model models/gan] [--threads 2] [--calls 200]

Each call is what serving does per request: the GAN's seeded latents, network and clamp; for the LDM one whole
sample (every step of the params' sampler with guidance, then the decoder). For the LDM also the registered model's
path, MLflow's pyfunc `predict` (pipelines/mlflow_model.py, fp32 like torch eager) at batch 80, and torch under bf16
autocast where the CPU has native bf16 (what `evaluate` samples with).
Goal (issue "Serving the champion"): ONNX Runtime at least 1.5x torch eager at batch 1, p50 under 10 ms for one GAN image.
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

from gen_core.config import load_config  # noqa: E402
from gen_core.diffusion import build_autoencoder, build_denoiser, diffusion_generator  # noqa: E402
from gen_core.generators import GanGenerator, load_image_generator  # noqa: E402
from gen_core.models import build_generator, gan_specs  # noqa: E402
from gen_core.onnx_diffusion import OnnxDiffusionGenerator, export_diffusion_onnx, sampling_record  # noqa: E402
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


class _Pyfunc:
    """The registered model's path: MLflow's pyfunc of pipelines/mlflow_model.py over the model directory."""

    def __init__(self, model, directory: str | None, tmp: str):
        import mlflow
        import pandas as pd

        if directory is None:
            directory = f"{tmp}/model"
            model.save_pretrained(directory, {"class_names": [str(i) for i in range(model.num_classes)]})
        mlflow.pyfunc.save_model(f"{tmp}/pyfunc", python_model=str(REPO / "pipelines/mlflow_model.py"), artifacts={"generator": directory},
                                 code_paths=[str(REPO / "gen_core")])  # fmt: skip
        self.pyfunc, self.frame, self.num_classes = mlflow.pyfunc.load_model(f"{tmp}/pyfunc"), pd.DataFrame, model.num_classes

    def sample(self, labels, seeds):
        return self.pyfunc.predict(self.frame({"label": labels.tolist(), "seed": list(seeds)}))


class _Autocast:
    def __init__(self, model):
        self.model, self.num_classes = model, model.num_classes

    def sample(self, labels, seeds):
        return self.model.sample(labels, seeds, autocast_dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["gan", "ldm"], default="gan")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--model", help="an exported GAN generator directory (default: the params' GAN, untrained)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="calls at batch 1 (a tenth of them at batch 64)")
    parser.add_argument("--out", help="default: benchmarks/serving_latency_<family>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.params)
    torch.manual_seed(0)
    if args.model:
        model, _ = load_image_generator(args.model)
    elif args.family == "gan":
        model = GanGenerator(build_generator(gan_specs(cfg.gan.model, cfg.data.resolution, cfg.data.channels, 10)[0]).eval())
    else:
        f = cfg.autoencoder.downsample_factor
        vae = build_autoencoder(cfg.autoencoder, cfg.data.channels).eval()
        unet = build_denoiser(cfg.ldm.denoiser, cfg.autoencoder.latent_channels, cfg.data.resolution // f, 10).eval()
        model = diffusion_generator(cfg.ldm, cfg.data, unet, vae, 10)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, GanGenerator):
            export_gan_onnx(model.generator, Path(tmp) / "generator.onnx")
            onnx = OnnxGanGenerator(Path(tmp) / "generator.onnx", model.generator.spec.z_dim, model.num_classes, args.threads)
            described = f"GAN {model.generator.spec}"
            parameters = sum(p.numel() for p in model.generator.parameters())
        else:
            export_diffusion_onnx(model, tmp)
            onnx = OnnxDiffusionGenerator(tmp, **sampling_record(model), threads=args.threads)
            described = f"LDM, sampler {model.sampler.name} {model.sampler.num_steps} steps, guidance {model.sampler.guidance_scale}"
            parameters = sum(p.numel() for p in model.unet.parameters()) + sum(p.numel() for p in (model.vae.decoder.parameters() if model.vae else []))
        calls = {1: args.calls, 64: max(args.calls // 10, 5)} if isinstance(model, GanGenerator) else {1: max(args.calls // 20, 3), 64: 3}
        paths = [("torch eager", model), ("onnxruntime", onnx)]
        if not isinstance(model, GanGenerator):
            calls[80] = 2
            paths += [("mlflow pyfunc", _Pyfunc(model, args.model, tmp))]
            if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
                paths += [("torch bf16 autocast", _Autocast(model))]
        rows = {}
        for batch, n in calls.items():
            for name, path in paths:
                if batch == 80 and name == "onnxruntime":
                    continue
                ms = latencies(path, batch, n)
                rows[f"{name}, batch {batch}"] = {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                                                  "img_per_s": batch * 1000 / float(np.median(ms)), "calls": n}  # fmt: skip
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, {described} ({parameters:,} parameters)")
    print("| path, batch | p50 ms | p90 ms | img/s (at p50) |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['img_per_s']:.0f} |")
    for batch in (1, 64):
        speedup = rows[f"torch eager, batch {batch}"]["p50_ms"] / rows[f"onnxruntime, batch {batch}"]["p50_ms"]
        print(f"batch {batch}: ONNX Runtime {speedup:.2f}x torch eager (p50)")
    for name in ("mlflow pyfunc", "torch bf16 autocast"):
        if f"{name}, batch 80" in rows:
            print(f"batch 80: {name} {rows[f'{name}, batch 80']['p50_ms'] / 1000:.1f} s vs torch eager "
                  f"{rows['torch eager, batch 80']['p50_ms'] / 1000:.1f} s")  # fmt: skip
    record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
              "family": args.family, "model": args.model or f"{args.params} (untrained)", "described": described, "rows": rows}  # fmt: skip
    Path(args.out or REPO / "benchmarks" / f"serving_latency_{args.family}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
