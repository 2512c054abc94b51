"""What one `mlflow server` costs the machine, with and without MLflow's server-side job runner: the busy CPU-seconds
(the whole machine's, /proc/stat) from starting the server until /health answers, then over an idle window, and the
number of processes it runs. Variants alternate, one server at a time, in one session:

    python benchmarks/mlflow_server_cost.py [--rounds 3] [--idle 30] [--workers 2]

MLflow 3.x starts the job runner by default (MLFLOW_SERVER_ENABLE_JOB_EXECUTION, for its GenAI judges and trace
rollups: huey consumers, one per job queue); genforge submits no server-side jobs, and its tests start their servers
without it (tests/conftest.py). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.suite_profile import cpu_model  # noqa: E402

from pipelines.ray_env import free_port  # noqa: E402

VARIANTS = {"job runner on (MLflow's default)": "true", "job runner off": "false"}


def busy_seconds() -> float:
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [d for child in children for d in descendants(int(child))]


def one_server(enabled: str, idle: float, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        port = free_port()
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": enabled}
        before, started = busy_seconds(), time.monotonic()
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", f"{root}/artifacts"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    if time.monotonic() - started > 120:
                        raise RuntimeError("mlflow server did not answer in 120 s") from None
                    time.sleep(0.2)
            ready_s, start_cpu = time.monotonic() - started, busy_seconds() - before
            time.sleep(idle / 2)
            processes = len(descendants(process.pid))
            idle_before = busy_seconds()
            time.sleep(idle / 2)
            idle_cpu = (busy_seconds() - idle_before) * 2
        finally:
            os.killpg(process.pid, 15)
            process.wait(30)
    return {"ready_s": round(ready_s, 2), "start_cpu_s": round(start_cpu, 2), "idle_cpu_s": round(idle_cpu, 2), "processes": processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle after /health answers (CPU measured over it)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    results = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, enabled in VARIANTS.items():
            results[name].append(one_server(enabled, args.idle, args.workers))
            print(f"round {round_ + 1} {name}: {results[name][-1]}", flush=True)
    print(f"\nmedians of {args.rounds} rounds, --workers {args.workers}, {args.idle:g} s idle ({cpu_model()}):")
    for name, runs in results.items():
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"  {name}: ready in {medians['ready_s']} s, start {medians['start_cpu_s']} CPU-s, idle {medians['idle_cpu_s']} CPU-s "
              f"per {args.idle:g} s, {medians['processes']:g} processes")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
