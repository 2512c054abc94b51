"""CPU settings for the training loops, each on and off, side by side: training-step img/s of the default params'
autoencoder (L1 + KL + LPIPS on every image), latent denoiser (U-Net s) and GAN (ResNet), bf16 autocast where native,
2 threads, as a 1-worker stage runs them on this machine (`--overlay profiles/ldm-quality.yaml`: that profile's
autoencoder and denoiser, on its 8-channel latents).

  attention  flash: torch's default kernel choice (the CPU flash kernel): what the loops ran before
             math:  gen_core.training.training_compute, what every training loop now runs its forward under
  heap       off:     glibc's default (large blocks from fresh mmap()s, faulted in and zeroed on first touch)
             mmap:    large blocks up to 32 MiB kept in glibc's heap (mallopt M_MMAP_THRESHOLD alone): not adopted
             retain:  pipelines.worker.retain_freed_memory, what every training worker sets: the mmap threshold
                      and the trim threshold raised (benchmarks/glibc_malloc.sh compares the two in page faults)
  compiled   product + torch.compile of the trained networks (and the frozen LPIPS network), `nn.Module.compile(dynamic=
             False)`, inductor's C++ code for the CPU: what `autoencoder.compile` / `ldm.compile` run (off by default;
             RESULTS.md, sessions 61-62); its one-off compilation is the "warm-up" column (the other variants' warm-up is
             their first two steps)

The allocator setting is process-wide, so every variant runs in a fresh child process (import, build, warm-up,
then timed steps); variants alternate within each round and the median of the rounds is reported. "product" is
what a training worker runs now (math attention, retain_freed_memory); "before" what the loops ran until session 56.

    python benchmarks/cpu_training.py [--rounds 3] [--steps 8] [--models ae,ldm,gan] [--variants before,math attention,...]
                                      [--overlay profiles/ldm-quality.yaml]

Models: ae, ldm (the default U-Net s), gan, and other denoisers as ldm-<benchmarks/denoiser_step.py variant>, e.g. ldm-unet-m,
ldm-dit-s (on the same latents and batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.suite_profile import cpu_model  # noqa: E402

from gen_core.config import load_config  # noqa: E402
from gen_core.training import autocast_dtype, training_compute  # noqa: E402
from pipelines.worker import MMAP_THRESHOLD_CEILING, retain_freed_memory, set_malloc_thresholds  # noqa: E402

VARIANTS = {  # name -> (attention, heap, compiled)
    "before": ("flash", "off", False),
    "math attention": ("math", "off", False),
    "heap": ("flash", "mmap", False),
    "both": ("math", "mmap", False),
    "product": ("math", "retain", False),  # what a training worker runs now
    "compiled": ("math", "retain", True),
}
MODELS_WITHOUT_ATTENTION = {"gan"}


def step_function(model: str, cfg, amp, attention: str, compiled: bool = False):
    """-> (one training step, its batch size): the ae or ldm stage's step on `cfg`'s model; compiled: its networks
    through torch.compile (compiled at the first step)."""
    cpu = torch.device("cpu")

    def context():
        if attention == "math":
            return training_compute(cpu, amp)
        return torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if model == "ae":
        from gen_core.diffusion import AutoencoderRoundTrip, autoencoder_loss, build_autoencoder
        from gen_core.lpips import load_lpips

        a = cfg.autoencoder
        net = AutoencoderRoundTrip(build_autoencoder(a, cfg.data.channels))
        optimizer = torch.optim.Adam(net.parameters(), lr=a.lr)
        lpips = load_lpips()
        if compiled:
            net.compile(dynamic=False)
            lpips.compile(dynamic=False)
        batch = torch.rand(a.global_batch_size, cfg.data.channels, cfg.data.resolution, cfg.data.resolution) * 2 - 1

        def loss():
            return autoencoder_loss(net, batch, a.reconstruction_loss, a.kl_weight, generator, lpips, a.perceptual_weight, a.perceptual_images)[0].mean()

        size = len(batch)
    elif model.split("-")[0] == "ldm":
        from benchmarks.denoiser_step import denoiser_config
        from gen_core.diffusion import build_denoiser, diffusion_loss, training_schedule

        d = cfg.ldm
        shape = (cfg.autoencoder.latent_channels, 8, 8)  # the autoencoder's latents of 32 x 32 images
        net = build_denoiser(denoiser_config(model[4:]) if model != "ldm" else d.denoiser, shape[0], shape[1], 10)
        optimizer = torch.optim.AdamW(net.parameters(), lr=d.lr)
        if compiled:
            net.compile(dynamic=False)
        schedule = training_schedule(d.noise)
        batch = torch.randn(d.global_batch_size, *shape, generator=torch.Generator().manual_seed(1))
        labels = torch.arange(d.global_batch_size) % 10

        def loss():
            return diffusion_loss(net, schedule, batch, labels, 10, d.label_dropout, generator, d.min_snr_gamma).mean()

        size = len(batch)
    else:
        raise ValueError(f"{model}: ae or ldm (gan runs benchmarks/gan_throughput.py's bare loop)")

    def step():
        with context():
            value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    return step, size


def child(model: str, variant: str, steps: int, overlays: list[str]) -> None:
    """Prints the variant's img/s, then its warm-up seconds (the first two steps, compilation included)."""
    attention, heap, compiled = VARIANTS[variant]
    if heap == "mmap" and not set_malloc_thresholds(MMAP_THRESHOLD_CEILING):  # the mmap threshold alone
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) refused or absent")
    if heap == "retain" and not retain_freed_memory():
        raise RuntimeError("retain_freed_memory: mallopt refused or absent")
    torch.set_num_threads(2)
    cfg = load_config(REPO / "params.yaml", overlays=overlays)
    amp = autocast_dtype(cfg.ldm.precision, torch.device("cpu"))
    if model == "gan":  # its bare loop times itself after its own warm-up
        from benchmarks.gan_throughput import bare_loop

        print(bare_loop(cfg, steps * 4, amp is not None, 2))
        return
    step, size = step_function(model, cfg, amp, attention, compiled)
    started = time.perf_counter()
    for _ in range(2):
        step()
    warm_up = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    print(steps * size / (time.perf_counter() - started), warm_up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--models", default="ae,ldm,gan")
    # compiled only when named: from a cold inductor cache it compiles for over a minute a network
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "compiled"), help="of: " + ", ".join(VARIANTS))
    parser.add_argument("--overlay", action="append", default=[], help="a profile over params.yaml (repeatable)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.steps, args.overlay)
        return
    variants = args.variants.split(",")
    if "before" not in variants or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: some of {', '.join(VARIANTS)}, including before (the baseline)")
    runs = [(m, v) for m in args.models.split(",") for v in variants
            if m not in MODELS_WITHOUT_ATTENTION or (VARIANTS[v][0] == "flash" and not VARIANTS[v][2])]  # fmt: skip
    rates: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    warm_ups: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    overlays = [arg for path in args.overlay for arg in ("--overlay", path)]
    for r in range(args.rounds):
        for model, variant in runs:
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), *overlays, "--child", model, variant],
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            rate, *warm_up = out.splitlines()[-1].split()  # the gan child prints its rate alone
            rates[(model, variant)].append(float(rate))
            warm_ups[(model, variant)].extend(float(w) for w in warm_up)
            print(f"round {r + 1}: {model} {variant}: {rates[(model, variant)][-1]:.1f} img/s", file=sys.stderr, flush=True)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores {cpu_model()}, torch {torch.__version__}, "
          f"{args.rounds} rounds x {args.steps} steps (gan: {args.steps * 4}), each variant in a fresh process"
          + "".join(f", --overlay {path}" for path in args.overlay))  # fmt: skip
    print("| model | variant | attention | heap | img/s (median) | vs before | warm-up s (median) | rounds |\n|---|---|---|---|---|---|---|---|")
    for model, variant in runs:
        median, base = statistics.median(rates[(model, variant)]), statistics.median(rates[(model, "before")])
        attention, heap, _ = VARIANTS[variant]
        warm_up = f"{statistics.median(warm_ups[(model, variant)]):.1f}" if warm_ups[(model, variant)] else "-"
        print(f"| {model} | {variant} | {attention if model not in MODELS_WITHOUT_ATTENTION else '-'} | {heap} | "
              f"{median:.1f} | {median / base:.2f}x | {warm_up} | {', '.join(f'{v:.0f}' for v in rates[(model, variant)])} |")


if __name__ == "__main__":
    main()
