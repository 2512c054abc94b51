"""Wall time of a 4-trial ASHA sweep over the D/G learning-rate ratio, and Tune's scheduling overhead
(sweep wall time against the sum of the trials' own times), on whatever this machine has.

Same configuration as tests/test_sweep.py (tiny profile: 1000 MNIST digits, 16-wide GAN, 40 steps
per trial at batch 32, a report every 10 steps), run once through the real stage:

    python benchmarks/sweep_overhead.py [--trials 4] [--steps 40]
    python benchmarks/sweep_overhead.py --checkout new:. --checkout old:../old-clone --rounds 2   # side by side

"Whole stage" includes Ray start, the best model's export, evaluate and register; busy CPU-s are the whole
machine's during the stage (/proc/stat), so run it on an idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from benchmarks.suite_profile import busy_seconds, cpu_model  # noqa: E402

from gen_core.config import merge  # noqa: E402


def tiny_params(**sections) -> dict:
    """params.yaml with the tiny profile (profiles/tiny.yaml, as in tests/test_sweep.py) and `sections` merged over it."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    return merge(merge(raw, yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())), sections)


def write_params(directory: Path, params: dict) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def one_sweep(checkout: Path, root: Path, name: str, base: dict, env: dict) -> dict:
    """The sweep stage of `checkout` on the upstream in `root`: its record, trials, wall and busy CPU-seconds."""
    directory = root / name
    params = {**base, "tracking": {**base["tracking"], "tracking_uri": f"sqlite:///{directory}/mlflow.db"},
              "sweep": {**base["sweep"], "name": name, "storage_path": str(directory / "tune"), "out_dir": str(directory / "sweep"),
                        "metrics_file": str(directory / "sweep.json")}}  # fmt: skip
    directory.mkdir()
    path = write_params(directory, params)
    started, busy = time.monotonic(), busy_seconds()
    result = subprocess.run([sys.executable, "-m", "pipelines.sweep", "--params", str(path)], cwd=checkout, env=env, capture_output=True, text=True)
    stage_s, cpu_s = time.monotonic() - started, busy_seconds() - busy
    if result.returncode:
        sys.exit(f"{name}: sweep failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return {"record": json.loads((directory / "sweep.json").read_text()), "stage_s": stage_s, "cpu_s": cpu_s,
            "trials": list(csv.DictReader((directory / "sweep" / "trials.csv").read_text().splitlines()))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkout", action="append", metavar="NAME:PATH",
                        help="the sweep stage of this checkout of the repository (repeatable: run alternately); default: this one")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    checkouts = [(c.split(":", 1)[0], Path(c.split(":", 1)[1]).resolve()) for c in args.checkout or [f"this:{REPO}"]]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = tiny_params(data={"out_dir": str(root / "prepared")}, classifier={"out_dir": str(root / "classifier"),
                             "metrics_file": str(root / "classifier.json")}, ref_stats={"out_dir": str(root / "ref_stats")})  # fmt: skip
        params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
        params["sweep"].update(
            enabled=True, num_trials=args.trials, total_steps=args.steps, report_every_steps=10, global_batch_size=32, probe_samples=100,
            final_fid_samples=100, space={"gan": {"lr_d_over_lr_g": {"type": "loguniform", "low": 0.25, "high": 16.0}}},
        )  # fmt: skip
        path = write_params(root, params)
        for stage in ("prepare", "classifier", "ref_stats"):
            subprocess.run([sys.executable, "-m", f"pipelines.{stage}", "--params", str(path)], cwd=REPO, env=env, check=True, capture_output=True)
        for round_ in range(args.rounds):
            for name, checkout in checkouts:
                runs.append({"checkout": name, "round": round_ + 1, **one_sweep(checkout, root, f"{name}-{round_}", params, env)})
                print(f"round {round_ + 1} {name}: {runs[-1]['stage_s']:.0f} s, {runs[-1]['cpu_s']:.0f} busy CPU-s", file=sys.stderr)
    print(f"# {time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} cores")
    print("| checkout | round | trial | status | reports | trial s | fid_classifier | fid |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        for row in run["trials"]:
            fid = f"{float(row['fid']):.1f}" if row["fid"] else "-"
            print(f"| {run['checkout']} | {run['round']} | {row['trial_id']} | {row['status']} | {row['reports']}/{row['of_reports']} "
                  f"| {row['time_s']} | {float(row['fid_classifier']):.2f} | {fid} |")  # fmt: skip
    print("\n| checkout | round | sweep wall (Tuner.fit) s | sum of trial s | wall/sum | stopped early | whole stage s | busy CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        r = run["record"]
        print(f"| {run['checkout']} | {run['round']} | {r['wall_s']} | {r['sum_trial_s']} | {r['scheduling_overhead']} | {r['stopped_early']} "
              f"| {run['stage_s']:.0f} | {run['cpu_s']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
