"""Few-step sampling against the full chain: one trained LDM, the evaluate stage at each sampler and step count.

    python benchmarks/ldm_samplers.py --model models/ldm --upstream . --tracking sqlite:///mlflow.db --guidance 3 \
        --samplers ddim:50,dpmsolver++:10,dpmsolver++:25,dpmsolver++:50,ddpm:1000

For each NAME:STEPS the exported model is copied with its generator.json's sampler set to NAME, STEPS and the
guidance, and `python -m pipelines.evaluate --family ldm` measures it at the params' protocol (same weights, same
seeds, same reference statistics from UPSTREAM's make repro). Prints a table with each sampler's FID relative to the
last one given (the reference: the full DDPM chain), and writes the rows to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(model: Path, upstream: Path, work: Path, tracking: str, sampler: str, steps: int, guidance: float) -> dict:
    directory = work / f"{sampler}-{steps}"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(model, directory / "ldm")
    meta_path = directory / "ldm" / "generator.json"
    meta = json.loads(meta_path.read_text())
    meta["sampler"] = {**meta["sampler"], "name": sampler, "num_steps": steps, "guidance_scale": guidance}
    meta_path.write_text(json.dumps(meta, indent=2))
    sets = {"outputs.ldm.out_dir": directory / "ldm", "evaluate.out_dir": directory / "eval", "data.out_dir": upstream / "data/prepared",
            "classifier.out_dir": upstream / "models/classifier", "ref_stats.out_dir": upstream / "data/ref_stats",
            "tracking.tracking_uri": tracking}  # fmt: skip
    command = [sys.executable, "-m", "pipelines.evaluate", "--family", "ldm"]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    started = time.monotonic()
    with open(directory / "evaluate.log", "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.monotonic() - started
    record = json.loads(next((directory / "eval").rglob("ldm.json")).read_text())
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "wall_s": round(wall, 1), "protocol": record.get("protocol_id"),
            **{k: record[k] for k in ("fid", "kid", "precision", "recall", "class_accuracy")}, "fid_floor": record["floor"]["fid"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported LDM directory (outputs.ldm.out_dir)")
    parser.add_argument("--upstream", type=Path, required=True, help="the project whose data, classifier and ref_stats to use")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ldm_samplers"))
    parser.add_argument("--tracking", required=True, help="the MLflow store the model was trained with (evaluate logs to its run)")
    parser.add_argument("--guidance", type=float, required=True)
    parser.add_argument("--samplers", default="ddim:50,dpmsolver++:10,dpmsolver++:25,dpmsolver++:50,ddpm:1000",
                        help="NAME:STEPS,...; the last one is the reference")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "ldm_samplers.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.samplers.split(","):
        name, steps = spec.split(":")
        rows.append(measure(args.model.resolve(), args.upstream.resolve(), args.work, args.tracking, name, int(steps), args.guidance))
        print(json.dumps(rows[-1]), flush=True)
    reference = rows[-1]["fid"]
    print(f"\n| sampler | steps | FID [floor {rows[-1]['fid_floor']:.1f}] | vs {rows[-1]['sampler']} {rows[-1]['steps']} | recall | precision | class acc | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['sampler']} | {row['steps']} | {row['fid']:.1f} | {100 * (row['fid'] / reference - 1):+.1f}% | {row['recall']:.3f} | "
              f"{row['precision']:.3f} | {row['class_accuracy']:.3f} | {row['wall_s']:.0f} |")  # fmt: skip
    args.out.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
