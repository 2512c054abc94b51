"""Latent diffusion vs pixel-space diffusion, one table, measured side by side in one run.

Both models are the same denoiser family (params `ldm.denoiser`), at the same image resolution,
with the same classifier-free guidance; the latent one runs on the autoencoder's latents.

Columns:
  - sampling latency per image: DDIM at 50 steps and the full DDPM chain (noise.num_train_timesteps),
    at batch 1 and batch 64. A cell whose predicted wall time exceeds --max-cell-s is extrapolated
    from the measured DDIM-50 run of the same batch (same network per step), and marked `~`.
  - peak memory while sampling: max RSS of a fresh process on CPU, max_memory_allocated on GPU.
  - training img/s and FID at a matched training budget: both trained by the real train_ldm stage
    (2 Ray workers) for --train-steps at --train-batch, then sampled with DDIM-50.
Plus, for the pipeline's trained LDM (models/ldm): Inception FID with DDIM-50 vs the full DDPM chain.

Needs the outputs of `make repro` (autoencoder, latents, ref_stats, classifier, models/ldm).

    python benchmarks/ldm_vs_pixel.py [--train-steps 150] [--fid-samples 300] [--out benchmarks/ldm_vs_pixel.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.suite_profile import cpu_model  # noqa: E402

from gen_core.config import load_config  # noqa: E402

BATCHES = (1, 64)


# ---------------------------------------------------------------------------
# Latency + peak memory (runs in a fresh subprocess per model, so max RSS is its own)
# ---------------------------------------------------------------------------


def build_model(cfg, space: str, directory: str | None):
    """The trained export when given, else an untrained denoiser of the same family (latency only depends on the shape)."""
    from gen_core.diffusion import DiffusionGenerator, build_denoiser, training_schedule
    from gen_core.latents import load_autoencoder

    if directory:
        return DiffusionGenerator.from_pretrained(directory)[0]
    vae = None
    channels, size = cfg.data.channels, cfg.data.resolution
    if space == "latent":
        vae = load_autoencoder(cfg.outputs.autoencoder.out_dir)
        channels, size = vae.config.latent_channels, cfg.data.resolution // cfg.autoencoder.downsample_factor
    unet = build_denoiser(cfg.ldm.denoiser, channels, size, 10).eval()
    image_shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    return DiffusionGenerator(unet, vae, dict(training_schedule(cfg.ldm.noise).config), 10, cfg.ldm.sampler, image_shape)


def latency_worker(args) -> None:
    from gen_core.training import autocast_dtype

    cfg = load_config(args.params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, args.space, args.model_dir).to(device)
    amp = autocast_dtype(cfg.evaluate.precision, device)
    full_chain = cfg.ldm.noise.num_train_timesteps
    results = {}

    def timed(sampler: str, steps: int, batch: int) -> float:
        labels = torch.arange(batch) % model.num_classes
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.sample(labels, list(range(batch)), device, sampler=sampler, num_steps=steps, autocast_dtype=amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    timed("ddim", 2, 2)  # warm-up
    for batch in BATCHES:
        ddim = timed("ddim", 50, batch)
        results[f"ddim50_b{batch}"] = {"s_per_image": ddim / batch, "measured": True}
        predicted = ddim * full_chain / 50
        if predicted <= args.max_cell_s:
            results[f"ddpm_b{batch}"] = {"s_per_image": timed("ddpm", full_chain, batch) / batch, "measured": True}
        else:
            results[f"ddpm_b{batch}"] = {"s_per_image": predicted / batch, "measured": False}
        print(f"[latency {args.space}] batch {batch}: ddim50 {ddim / batch:.4f} s/img, ddpm {results[f'ddpm_b{batch}']['s_per_image']:.4f} s/img", flush=True)
    if device.type == "cuda":
        results["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        results["memory_kind"] = "cuda max_memory_allocated"
    else:
        results["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results["memory_kind"] = "max RSS"
    Path(args.result).write_text(json.dumps(results))


# ---------------------------------------------------------------------------
# Matched-budget training (the real stage) and FID
# ---------------------------------------------------------------------------


def train_stage(args, space: str, work: Path) -> tuple[Path, float]:
    out = work / space
    cmd = [sys.executable, "-m", "pipelines.train_ldm", "--params", args.params,
           "--set", f"ldm.space={space}", "--set", f"ldm.total_steps={args.train_steps}",
           "--set", f"ldm.global_batch_size={args.train_batch}", "--set", f"ldm.checkpoint_every_steps={args.train_steps}",
           "--set", f"ldm.log_every_steps={max(args.train_steps // 10, 1)}", "--set", f"outputs.ldm.out_dir={out}",
           "--set", f"outputs.ldm.losses_file={work}/{space}_losses.csv", "--set", f"ray.storage_path={work}/ray",
           "--set", "ldm.run_name=bench", "--set", f"tracking.tracking_uri=sqlite:///{work}/bench.db"]  # fmt: skip
    print(f"[train {space}] {args.train_steps} steps at batch {args.train_batch}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    rows = list(csv.DictReader((work / f"{space}_losses.csv").read_text().splitlines()))
    rates = [float(r["img_per_s"]) for r in rows[1:]] or [float(rows[0]["img_per_s"])]  # first window includes warm-up
    return out, float(np.median(rates))


def fid_of(cfg, model_dir: Path | str, samples: int, sampler: str, steps: int) -> dict:
    from gen_core.diffusion import DiffusionGenerator
    from gen_core.metrics import FeatureStats, fid_from_stats, load_inception, load_ref_stats
    from gen_core.training import autocast_dtype
    from gen_core.classifier import load_classifier
    from pipelines.evaluation import features_for_indices

    model, _ = DiffusionGenerator.from_pretrained(model_dir)
    model.sampler = model.sampler.model_copy(update={"name": sampler, "num_steps": steps})
    classifier, _ = load_classifier(cfg.classifier.out_dir)
    inception = load_inception(cfg.ref_stats.inception, precision=cfg.evaluate.active.inception_precision)
    started = time.monotonic()
    parts = features_for_indices(model, classifier, inception, np.arange(samples), cfg.evaluate.seed, cfg.evaluate.batch_size,
                                 "cpu", amp_dtype=autocast_dtype(cfg.evaluate.precision, torch.device("cpu")))  # fmt: skip
    stats = FeatureStats(2048)
    stats.update(parts["inception"].astype(np.float64))
    reference = load_ref_stats(f"{cfg.reference_dir}/inception.npz")
    result = {"fid": fid_from_stats(stats.mu, stats.sigma, reference["mu"], reference["sigma"]),
              "class_accuracy": float((parts["probabilities"].argmax(1) == parts["labels"]).mean()), "samples": samples, "sampler": sampler, "steps": steps,
              "seconds": time.monotonic() - started}  # fmt: skip
    print(f"[fid] {model_dir} {sampler}-{steps}: fid {result['fid']:.2f} accuracy {result['class_accuracy']:.3f} ({result['seconds']:.0f} s)", flush=True)
    return result


def measure_latency(args, space: str, model_dir: str | None, work: Path) -> dict:
    result = work / f"latency_{space}.json"
    cmd = [sys.executable, __file__, "--worker", "latency", "--space", space, "--params", args.params,
           "--result", str(result), "--max-cell-s", str(args.max_cell_s)] + (["--model-dir", model_dir] if model_dir else [])  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads(result.read_text())


def cell(entry: dict) -> str:
    return f"{'' if entry['measured'] else '~'}{entry['s_per_image'] * 1000:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--fid-samples", type=int, default=300)
    parser.add_argument("--chain-fid-samples", type=int, default=500, help="samples for the DDIM-50 vs DDPM chain FIDs")
    parser.add_argument("--max-cell-s", type=float, default=90.0)
    parser.add_argument("--out", default="benchmarks/ldm_vs_pixel.json")
    parser.add_argument("--worker", choices=["latency"], help=argparse.SUPPRESS)
    parser.add_argument("--space", choices=["latent", "pixel"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return latency_worker(args)

    cfg = load_config(args.params)
    started = time.monotonic()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
              "device": "cuda" if torch.cuda.is_available() else "cpu", "params": vars(args)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report["latency"] = {space: measure_latency(args, space, None, work) for space in ("latent", "pixel")}
        matched = {}
        for space in ("latent", "pixel"):
            model_dir, rate = train_stage(args, space, work)
            matched[space] = {"train_img_per_s": rate, **fid_of(cfg, model_dir, args.fid_samples, "ddim", 50)}
        report["matched_budget"] = matched
        report["chain"] = {
            "ddim50": fid_of(cfg, cfg.outputs.ldm.out_dir, args.chain_fid_samples, "ddim", 50),
            "ddpm_full": fid_of(cfg, cfg.outputs.ldm.out_dir, args.chain_fid_samples, "ddpm", cfg.ldm.noise.num_train_timesteps),
        }
    report["wall_s"] = time.monotonic() - started
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    lat, full = report["latency"], cfg.ldm.noise.num_train_timesteps
    print(f"\nLDM vs pixel diffusion, {cfg.data.resolution}x{cfg.data.resolution}x{cfg.data.channels}, guidance "
          f"{cfg.ldm.sampler.guidance_scale}, {report['device']} ({report['machine']})")  # fmt: skip
    print(f"| model | DDIM-50 b1 ms/img | DDIM-50 b64 ms/img | DDPM-{full} b1 ms/img | DDPM-{full} b64 ms/img | peak memory MiB | train img/s | FID (matched budget, DDIM-50) | class acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for space in ("latent", "pixel"):
        l, m = lat[space], matched[space]
        print(f"| {space} | {cell(l['ddim50_b1'])} | {cell(l['ddim50_b64'])} | {cell(l['ddpm_b1'])} | {cell(l['ddpm_b64'])} | "
              f"{l['peak_memory_bytes'] / 2**20:.0f} | {m['train_img_per_s']:.0f} | {m['fid']:.1f} | {m['class_accuracy']:.3f} |")  # fmt: skip
    speedup = {k: lat["pixel"][k]["s_per_image"] / lat["latent"][k]["s_per_image"] for k in ("ddim50_b1", "ddim50_b64", "ddpm_b1", "ddpm_b64")}
    print("pixel/latent latency ratio: " + ", ".join(f"{k} {v:.1f}x" for k, v in speedup.items()))
    chain = report["chain"]
    print(f"trained LDM ({cfg.outputs.ldm.out_dir}): FID DDIM-50 {chain['ddim50']['fid']:.2f} vs DDPM-{full} {chain['ddpm_full']['fid']:.2f} "
          f"({chain['ddim50']['fid'] / chain['ddpm_full']['fid'] - 1:+.1%}), {args.chain_fid_samples} samples; wall {report['wall_s']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
