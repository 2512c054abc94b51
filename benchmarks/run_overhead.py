"""What a short training run costs beyond its training: wall time and CPU-seconds of a 10-step, 2-worker
GAN run of the tiny profile (the kind of run the tests make dozens of), under environment variants run
alternately in one session, and optionally where the CPU went, process by process.

    python benchmarks/run_overhead.py [--rounds 3] [--processes]
        [--variant NAME:VAR=VALUE,...]   (default: the stage as shipped vs with its Ray's dashboard on)
    python benchmarks/run_overhead.py --idle-ray 60 [--no-dashboard]   (what an idle `ray start --head` costs a minute, by role)
    python benchmarks/run_overhead.py --variant own: --variant joined:ray.address=HEAD   (a stage joining a running head)

`ray.address=HEAD` in a variant: the run joins a `ray start --head` (no dashboard, 2 CPUs, token authentication as the
README sets up) that the script starts before the first round and stops after the last, instead of starting a Ray of its own.

CPU-seconds are the whole machine's busy time during the run (/proc/stat), so run it on an idle machine.
--processes samples every process's CPU time from /proc five times a second and groups them by role
(Ray's daemons, the stage's own process, each kind of Ray worker); it adds a little CPU of its own.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.suite_profile import busy_seconds, cpu_model, process_cpu  # noqa: E402
from benchmarks.sweep_overhead import tiny_params, write_params  # noqa: E402

DEFAULT_VARIANTS = ["as-shipped:", "dashboard:ray.dashboard=true"]  # VAR=VALUE: an environment variable; a.b=VALUE: a params override
ROLES = [  # (role, pattern in the command line), first match wins
    ("gcs_server", "gcs_server"), ("raylet", "raylet"), ("dashboard", "dashboard/dashboard.py"), ("dashboard", "ray-dashboard-"),
    ("dashboard agent", "dashboard/agent.py"),
    ("runtime env agent", "runtime_env/agent"), ("log monitor", "log_monitor"), ("stage process", "pipelines.train_gan"),
]  # fmt: skip


def role(cmdline: str) -> str:
    for name, pattern in ROLES:
        if pattern in cmdline:
            return name
    if cmdline.startswith("ray::"):  # a Ray worker retitles itself after what it runs: ray::TrainController.run, ray::IDLE
        return f"ray worker {cmdline.split()[0].split('.')[0]}"
    return "ray worker (starting)" if "default_worker" in cmdline else "other"


class ProcessSampler(threading.Thread):
    """Each process's last-seen CPU time (utime + stime), sampled until stop()."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.seen, self.done = interval, {}, threading.Event()
        self.before = set(os.listdir("/proc"))

    def run(self) -> None:
        while not self.done.wait(self.interval):
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid in self.before or (found := process_cpu(pid)) is None:
                    continue
                _, cpu, cmdline = found
                name = role(cmdline)  # Ray workers retitle themselves after they start; an exiting process has no cmdline
                if name in ("other", "ray worker (starting)") and pid in self.seen:
                    name = self.seen[pid][1]
                self.seen[pid] = (cpu, name)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        totals, counts = collections.Counter(), collections.Counter()
        for cpu, name in self.seen.values():
            totals[name] += cpu
            counts[name] += 1
        return {name: {"cpu_s": round(totals[name], 1), "processes": counts[name]} for name, _ in totals.most_common()}


def one_run(root: Path, params: Path, env: dict, overrides: list[str], n: int, processes: bool) -> dict:
    storage = root / f"ray-{n}"
    command = [sys.executable, "-m", "pipelines.train_gan", "--params", str(params), "--set", f"ray.storage_path={storage}",
               "--set", f"outputs.gan.out_dir={root}/gan-{n}", "--set", f"outputs.gan.losses_file={root}/losses-{n}.csv",
               "--set", f"outputs.gan.eval_file={root}/eval-{n}.csv", "--set", "gan.total_steps=10", "--set", "gan.checkpoint_every_steps=5", *(f"--set={o}" for o in overrides)]  # fmt: skip
    sampler = ProcessSampler() if processes else None
    if sampler:
        sampler.start()
    busy, started = busy_seconds(), time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.monotonic() - started, busy_seconds() - busy
    if result.returncode != 0:
        raise SystemExit(f"error: training run failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    finished = re.search(r"finished 10 steps in (\d+)s", result.stdout)
    row = {"wall_s": round(wall, 1), "busy_cpu_s": round(cpu, 1), "training_s": int(finished.group(1)) if finished else None}
    if sampler:
        row["processes"] = sampler.stop()
    return row


@contextlib.contextmanager
def ray_head(dashboard: bool = True, env: dict | None = None):
    """A `ray start --head --block` (its own temp dir and ports, 2 CPUs), yielding its GCS address; ending the
    blocking `ray start` stops the processes it started."""
    from pipelines.ray_env import free_port

    with tempfile.TemporaryDirectory(prefix="head-", dir="/tmp") as tmp:  # Ray's socket paths must stay under 107 bytes
        ports = [str(free_port()) for _ in range(4)]
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", tmp,
                   "--port", ports[0], "--dashboard-agent-listen-port", ports[2], "--ray-client-server-port", ports[3], "--disable-usage-stats",
                   *(["--dashboard-host", "127.0.0.1", "--dashboard-port", ports[1]] if dashboard else ["--include-dashboard=false"])]  # fmt: skip
        head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**(env or os.environ), "RAY_ADDRESS": ""})
        try:
            time.sleep(20)
            yield f"127.0.0.1:{ports[0]}"
        finally:
            head.terminate()
            head.wait(60)


def idle_ray(seconds: float, dashboard: bool = True) -> dict:
    """CPU-seconds of a Ray head that runs nothing, over `seconds` after 20 s of start-up, by role: what a Ray
    kept alive between runs would cost."""
    sampler = ProcessSampler()
    sampler.start()
    with ray_head(dashboard):
        at_start = collections.Counter()
        for cpu, name in dict(sampler.seen).values():
            at_start[name] += cpu
        time.sleep(seconds)
        usage = sampler.stop()
    return {name: round(u["cpu_s"] - at_start[name], 2) for name, u in usage.items() if u["cpu_s"] - at_start[name] >= 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", action="store_true", help="also sample every process's CPU time, grouped by role")
    parser.add_argument("--variant", action="append", help="NAME:VAR=VALUE,... (repeatable; default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "run_overhead.json")
    parser.add_argument("--idle-ray", type=float, metavar="SECONDS", help="only measure an idle Ray head over SECONDS")
    parser.add_argument("--no-dashboard", action="store_true", help="--idle-ray: a head without its dashboard")
    args = parser.parse_args()
    if args.idle_ray:
        usage = idle_ray(args.idle_ray, dashboard=not args.no_dashboard)
        print(f"idle Ray head{' without its dashboard' if args.no_dashboard else ''}, {args.idle_ray:.0f} s: {sum(usage.values()):.1f} CPU-s ({', '.join(f'{k} {v}' for k, v in usage.items() if v)})")
        return
    variants = {}
    for spec in args.variant or DEFAULT_VARIANTS:
        name, _, assignments = spec.partition(":")
        variants[name] = dict(item.split("=", 1) for item in assignments.split(",") if item)
    base = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    base.pop("RAY_ADDRESS", None)
    joins = any(v.get("ray.address") == "HEAD" for v in variants.values())
    if joins:  # a local Ray's token (~/.ray/auth_token), sent by the joining runs
        base["RAY_AUTH_MODE"] = "token"
    with tempfile.TemporaryDirectory() as tmp, ray_head(dashboard=False, env=base) if joins else contextlib.nullcontext() as head:
        root = Path(tmp)
        params = tiny_params(data={"out_dir": str(root / "prepared")}, gan={"evaluation": {"every_steps": None}})
        params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
        path = write_params(root, params)
        subprocess.run([sys.executable, "-m", "pipelines.prepare", "--params", str(path)], cwd=REPO, env=base, check=True, capture_output=True)
        rows = collections.defaultdict(list)
        for n in range(args.rounds):
            for name, extra in variants.items():
                env = {**base, **{k: v for k, v in extra.items() if "." not in k}}
                overrides = [f"{k}={head if v == 'HEAD' else v}" for k, v in extra.items() if "." in k]
                row = one_run(root, path, env, overrides, sum(map(len, rows.values())), args.processes)
                rows[name].append(row)
                print(f"round {n + 1} {name}: wall {row['wall_s']} s, busy CPU {row['busy_cpu_s']} s, training {row['training_s']} s", flush=True)
                for who, usage in row.get("processes", {}).items():
                    print(f"    {usage['cpu_s']:6.1f} CPU-s  {usage['processes']:2d} x {who}")
    summary = {name: {"variant": variants[name], "mean_wall_s": round(sum(r["wall_s"] for r in runs) / len(runs), 1),
                      "mean_busy_cpu_s": round(sum(r["busy_cpu_s"] for r in runs) / len(runs), 1), "runs": runs} for name, runs in rows.items()}  # fmt: skip
    for name, s in summary.items():
        print(f"{name}: mean wall {s['mean_wall_s']} s, mean busy CPU {s['mean_busy_cpu_s']} s over {len(s['runs'])} runs")
    model = cpu_model()
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {model}", "cpu_model": model,
              "run": "train_gan, tiny profile, 10 steps, 2 workers (DDP), checkpoint every 5, no in-training evaluation", "variants": summary}  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
