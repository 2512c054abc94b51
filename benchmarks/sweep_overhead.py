"""Wall time of a 4-trial ASHA sweep over the D/G learning-rate ratio, and Tune's scheduling overhead
(sweep wall time against the sum of the trials' own times), on whatever this machine has.

Same configuration as tests/test_sweep.py (tiny profile: 1000 MNIST digits, 16-wide GAN, 40 steps
per trial at batch 32, a report every 10 steps), run once through the real stage:

    python benchmarks/sweep_overhead.py [--trials 4] [--steps 40]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from gen_core.config import merge  # noqa: E402


def tiny_params(**sections) -> dict:
    """params.yaml with the tiny profile (profiles/tiny.yaml, as in tests/test_sweep.py) and `sections` merged over it."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    return merge(merge(raw, yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())), sections)


def write_params(directory: Path, params: dict) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = tiny_params(data={"out_dir": str(root / "prepared")}, classifier={"out_dir": str(root / "classifier"),
                             "metrics_file": str(root / "classifier.json")}, ref_stats={"out_dir": str(root / "ref_stats")})  # fmt: skip
        params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
        params["sweep"].update(
            enabled=True, num_trials=args.trials, total_steps=args.steps, report_every_steps=10, global_batch_size=32, probe_samples=100,
            final_fid_samples=100, space={"gan": {"lr_d_over_lr_g": {"type": "loguniform", "low": 0.25, "high": 16.0}}},
            storage_path=str(root / "tune"), out_dir=str(root / "sweep"), metrics_file=str(root / "sweep.json"),
        )  # fmt: skip
        path = write_params(root, params)
        for stage in ("prepare", "classifier", "ref_stats"):
            subprocess.run([sys.executable, "-m", f"pipelines.{stage}", "--params", str(path)], cwd=REPO, env=env, check=True, capture_output=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pipelines.sweep", "--params", str(path)], cwd=REPO, env=env, capture_output=True, text=True)
        stage_s = time.monotonic() - started
        if result.returncode:
            sys.exit(f"sweep failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        record = json.loads((root / "sweep.json").read_text())
        trials = list(csv.DictReader((root / "sweep" / "trials.csv").read_text().splitlines()))
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| trial | status | reports | trial s | fid_classifier | fid |")
    print("|---|---|---|---|---|---|")
    for row in trials:
        fid = f"{float(row['fid']):.1f}" if row["fid"] else "-"
        print(f"| {row['trial_id']} | {row['status']} | {row['reports']}/{row['of_reports']} | {row['time_s']} | {float(row['fid_classifier']):.2f} | {fid} |")
    print(f"\nsweep wall (Tuner.fit) {record['wall_s']} s; sum of trial times {record['sum_trial_s']} s; "
          f"wall/sum {record['scheduling_overhead']}; {record['stopped_early']} stopped early")
    print(f"whole stage incl. Ray start, best-model export, evaluate and register: {stage_s:.0f} s")


if __name__ == "__main__":
    main()
