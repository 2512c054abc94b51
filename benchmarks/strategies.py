"""Distributed strategies side by side, on 2 CPU workers (processes, gloo, 1 thread each), in one run:
ddp, fsdp (FSDP2, block units) and DeepSpeed ZeRO-1/2/3, for both model families at the default
params' model sizes and global batches, under the default precision (bf16 autocast where supported).

Per (family, strategy):
  img/s         steady-state training throughput (after warm-up steps), the loop's own step
                (train_gan.gan_step with EMA update; the denoiser's diffusion step with EMA update)
  peak RSS      per worker (max over the 2 ranks; ru_maxrss of the worker process, imports included)
  save / load   seconds to write / read the training state in the strategy's own form (every rank
                its part, to local disk) plus the gather of the EMA weights that a checkpoint exports

The workers run the strategies of pipelines.strategy directly (no Ray start-up in the numbers).

    python benchmarks/strategies.py [--steps 30] [--out benchmarks/strategies.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.suite_profile import cpu_model  # noqa: E402

CASES = {"ddp": ("ddp", None), "fsdp": ("fsdp", None),
         **{f"zero{n}": ("deepspeed", f"cluster_configs/deepspeed/zero{n}.json") for n in (1, 2, 3)}}  # fmt: skip


def worker(rank: int, world: int, port: int, family: str, case: str, steps: int, warmup: int, out: str) -> None:
    import torch.distributed as dist

    from gen_core.config import load_config
    from gen_core.training import autocast_dtype
    from pipelines.strategy import build_strategy, deepspeed_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(REPO / "params.yaml")
    name, ds_path = CASES[case]
    loop = cfg.gan if family == "gan" else cfg.ldm
    ds = deepspeed_config(REPO / ds_path, loop.global_batch_size, world) if ds_path else None
    strategy = build_strategy(name, torch.device("cpu"), cfg.ray.fsdp, ds, str(ds_path))
    amp = autocast_dtype(loop.precision, torch.device("cpu"))
    autocast = lambda: torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731
    step_fn, parts, main = (_gan if family == "gan" else _ldm)(cfg, strategy, rank, world, autocast)

    for step in range(warmup):
        step_fn(step)
    dist.barrier()
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        step_fn(step)
    dist.barrier()
    rate = steps * loop.global_batch_size / (time.perf_counter() - started)

    with contextlib.nullcontext(Path(out).parent) as tmp:  # one directory for all ranks, as after a download
        directory = Path(tmp) / "checkpoint"
        directory.mkdir(exist_ok=True)
        dist.barrier()
        started = time.perf_counter()
        strategy.save_parts(parts, directory)
        strategy.gather(main, "ema")
        dist.barrier()
        save_s = time.perf_counter() - started
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        started = time.perf_counter()
        strategy.load_parts(parts, directory)
        dist.barrier()
        load_s = time.perf_counter() - started
    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if rank == 0:  # every rank wrote into the one directory, measured after the barrier: its size is the checkpoint's
        Path(out).write_text(json.dumps({"img_per_s": rate, "peak_rss_mib": max(rss), "rss_per_rank": rss, "save_s": save_s,
                                         "load_s": load_s, "checkpoint_mib": size / 2**20}))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip C++ static destructors: DeepSpeed's comm op can abort at interpreter exit


def _gan(cfg, strategy, rank, world, autocast):
    from gen_core.models import ema_beta
    from gen_core.training import step_generator
    from gen_core.losses import gan_objective
    from gen_core.models import build_discriminator, build_generator, gan_specs
    from pipelines.gan_step import gan_step

    t = cfg.gan
    torch.manual_seed(0)
    g_spec, d_spec = gan_specs(t.model, cfg.data.resolution, cfg.data.channels, 10)
    layout = torch.channels_last if strategy.name == "ddp" else torch.contiguous_format  # as in the loop
    betas = (t.adam_beta1, t.adam_beta2)
    G = strategy.wrap("G", build_generator(g_spec).to(memory_format=layout), lambda p: torch.optim.Adam(p, lr=t.lr_g, betas=betas), ema=True)
    D = strategy.wrap("D", build_discriminator(d_spec).to(memory_format=layout), lambda p: torch.optim.Adam(p, lr=t.lr_d, betas=betas))
    n = t.global_batch_size // world
    real = torch.rand(n, 1, 32, 32) * 2 - 1
    labels = torch.randint(0, 10, (n,))

    def step(i):
        gan_step(G, D, real, labels, step_generator(0, i, rank), g_spec.z_dim, gan_objective(t), t.d_steps_per_g_step, autocast, i)
        strategy.update_ema(G, ema_beta(t.global_batch_size, (i + 1) * t.global_batch_size, t.ema_halflife_kimg, t.ema_rampup_ratio))

    return step, [G, D], G


def _ldm(cfg, strategy, rank, world, autocast):
    from gen_core.diffusion import build_denoiser, diffusion_loss, training_schedule
    from gen_core.training import step_generator

    d = cfg.ldm
    torch.manual_seed(0)
    make = lambda p: torch.optim.AdamW(p, lr=d.lr, betas=(d.adam_beta1, d.adam_beta2), weight_decay=d.weight_decay)  # noqa: E731
    unet = strategy.wrap("unet", build_denoiser(d.denoiser, 4, 8, 10), make, ema=True)
    schedule = training_schedule(d.noise)
    n = d.global_batch_size // world
    x0, labels = torch.randn(n, 4, 8, 8), torch.randint(0, 10, (n,))

    def step(i):
        with autocast():
            loss = diffusion_loss(unet.forward, schedule, x0, labels, 10, d.label_dropout, step_generator(0, i, rank)).mean()
        unet.backward(loss)
        unet.step()
        strategy.update_ema(unet, 0.999)

    return step, [unet], unet


def measure(family: str, case: str, steps: int, warmup: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        with contextlib.redirect_stdout(sys.stderr):
            mp.start_processes(worker, args=(2, port, family, case, steps, warmup, str(out)), nprocs=2, start_method="spawn")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--families", default="gan,ldm")
    parser.add_argument("--cases", default=",".join(CASES), help="subset of " + ",".join(CASES))
    parser.add_argument("--out", default=str(REPO / "benchmarks/strategies.json"))
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_model()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "steps": args.steps, "rows": []}  # fmt: skip
    print(f"{'family':6} {'strategy':8} {'img/s':>8} {'peak RSS/worker MiB':>20} {'save s':>7} {'load s':>7} {'ckpt MiB':>9}")
    for family in args.families.split(","):
        for case in args.cases.split(","):
            row = {"family": family, "strategy": case, **measure(family, case, args.steps, args.warmup)}
            results["rows"].append(row)
            print(f"{family:6} {case:8} {row['img_per_s']:8.0f} {row['peak_rss_mib']:20.0f} {row['save_s']:7.2f} {row['load_s']:7.2f} "
                  f"{row['checkpoint_mib']:9.1f}", flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
