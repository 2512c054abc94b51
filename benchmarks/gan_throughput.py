"""GAN step throughput (img/s), measured side by side in one run:

  1. bare single-process torch loop, fp32
  2. bare single-process torch loop, bf16 autocast
  (each bare loop in the layout the train_gan loop uses under ddp, channels_last, and, with
   --layouts channels_last,contiguous, also in the plain contiguous layout for comparison)
  3. the Ray Train path (pipelines.train_gan.train_loop_per_worker), 1 worker
  4. the Ray Train path, 2 workers

Each variant does the full D+G step of the default params' model at the default global batch.
The Ray numbers are taken from the loop's own img/s log (steady state, excluding Ray start-up),
so they compare the training step itself.
Every variant gets the same 2 cores: the bare loops 2 threads, the 1-worker Ray run 2 CPUs
(Ray sets the worker's thread count from its CPUs), the 2-worker run 1 CPU each.

    python benchmarks/gan_throughput.py [--steps 200] [--layouts channels_last,contiguous]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.suite_profile import cpu_model  # noqa: E402

from gen_core.config import load_config  # noqa: E402
from gen_core.losses import discriminator_loss, gan_objective, generator_loss  # noqa: E402
from gen_core.models import build_discriminator, build_generator, gan_specs, requires_grad  # noqa: E402


LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def bare_loop(cfg, steps: int, amp: bool, threads: int, layout: str = "channels_last") -> float:
    torch.set_num_threads(threads)
    g_spec, d_spec = gan_specs(cfg.gan.model, cfg.data.resolution, cfg.data.channels, 10)
    G = build_generator(g_spec).to(memory_format=LAYOUTS[layout])  # as the train_gan loop does under ddp
    D = build_discriminator(d_spec).to(memory_format=LAYOUTS[layout])
    objective = gan_objective(cfg.gan)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.gan.lr_g, betas=(cfg.gan.adam_beta1, cfg.gan.adam_beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.gan.lr_d, betas=(cfg.gan.adam_beta1, cfg.gan.adam_beta2))
    batch = cfg.gan.global_batch_size
    real = (torch.rand(batch, g_spec.channels, g_spec.resolution, g_spec.resolution) * 2 - 1).to(memory_format=LAYOUTS[layout])
    labels = torch.randint(0, 10, (batch,))
    noise = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                fake = G(torch.randn(batch, g_spec.z_dim), labels)
            d_loss = discriminator_loss(objective, D, real, fake, labels, noise, objective.penalised)[0].mean()
        opt_D.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_D.step()
        requires_grad(D, False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            g_loss = generator_loss(objective, D, G(torch.randn(batch, g_spec.z_dim), labels), labels, real, noise).mean()
        opt_G.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_G.step()
        requires_grad(D, True)

    for _ in range(10):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def ray_path(params_path: Path, workers: int, cpus_per_worker: int, steps: int, work: Path) -> float:
    """Run the real train_gan stage and read the steady-state img/s from its loss history."""
    out = work / f"ray{workers}"
    cmd = [sys.executable, "-m", "pipelines.train_gan", "--params", str(params_path),
           "--set", f"ray.num_workers={workers}", "--set", f"ray.cpus_per_worker={cpus_per_worker}", "--set", f"ray.storage_path={out}/ray", "--set", f"gan.run_name=bench{workers}",
           "--set", f"gan.total_steps={steps}", "--set", f"gan.checkpoint_every_steps={steps}",
           "--set", f"gan.log_every_steps={max(steps // 4, 1)}", "--set", f"outputs.gan.out_dir={out}/gan",
           "--set", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", "--set", f"outputs.gan.losses_file={out}/losses.csv"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    rows = list(csv.DictReader((out / "losses.csv").read_text().splitlines()))
    rates = [float(r["img_per_s"]) for r in rows[1:]]  # first window includes warm-up
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--layouts", default="channels_last", help="bare-loop memory layouts: channels_last (the loop's), contiguous")
    args = parser.parse_args()
    cfg = load_config(args.params)
    if not (REPO / cfg.data.out_dir / "manifest.json").exists():
        sys.exit(f"{cfg.data.out_dir}: run `dvc repro prepare` first (the Ray path reads the prepared data)")
    threads = 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params_path = work / "params.yaml"
        params_path.write_text(yaml.safe_dump(yaml.safe_load(Path(args.params).read_text())))
        for layout in args.layouts.split(","):
            suffix = "" if layout == "channels_last" else f" {layout}"
            results[f"bare fp32{suffix}"] = bare_loop(cfg, args.steps // 2, amp=False, threads=threads, layout=layout)
            results[f"bare bf16{suffix}"] = bare_loop(cfg, args.steps // 2, amp=True, threads=threads, layout=layout)
        results["ray 1 worker x 2 CPUs (bf16)"] = ray_path(params_path, 1, 2, args.steps, work)
        results["ray 2 workers x 1 CPU (bf16)"] = ray_path(params_path, 2, 1, args.steps, work)

    base = results.get("bare bf16", next(iter(results.values())))
    print(f"# GAN step throughput, {time.strftime('%Y-%m-%d')}, {cpu_model()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, global batch {cfg.gan.global_batch_size}")  # fmt: skip
    print("| variant | img/s | vs bare bf16 |\n|---|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
