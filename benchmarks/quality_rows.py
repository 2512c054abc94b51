"""Rows of benchmarks/quality.json for the default run's models, from what the stages wrote in a checkout:
the evaluate records (metrics/eval/<protocol>/<family>.json), the exports' generator.json and the protocol's floor.

    make repro && make eval-standard && python benchmarks/quality_rows.py [--protocol standard] [--note TEXT]

or the LDM of one benchmarks/ae_variants.sh work directory (with the upstream project it read, for the floor):

    python benchmarks/quality_rows.py --protocol quick --variant WORK/NAME --upstream UPSTREAM --recipe NAME --overrides "k=v ..."

or one row per guidance scale of a guidance sweep (benchmarks/ldm_variants.sh's work directories, or a project's own
metrics/eval/<protocol>/ldm_guidance.json with --sweep .), recipes "NAME g<scale>":

    python benchmarks/quality_rows.py --protocol quick --sweep WORK/NAME --recipe NAME --overrides "k=v ..."

or the LDM of any project, with its own output directories (a profile's, or --set outputs.ldm.out_dir=... runs):

    python benchmarks/quality_rows.py --protocol standard --project P --family ldm --generator P/models/ldm-quality \
        --evaluated P/metrics/eval --profile quality --recipe NAME

The same for a conditional family (pix2pix, t2i) of a benchmarks/conditional_variants.sh work directory, with the
training's wall-clock from its log:

    python benchmarks/quality_rows.py --protocol quick --project UPSTREAM --family pix2pix --generator WORK/NAME/model \
        --evaluated WORK/NAME/eval --recipe NAME --train-wall-s 241

A row replaces the one of the same family, recipe, profile and protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.suite_profile import cpu_model  # noqa: E402

METRICS = ("fid", "kid", "precision", "recall", "class_accuracy", "fid_classifier", "diversity", "classes_covered")
EXTRAPOLATED = ("fid_extrapolated", "fid_extrapolated_to", "fid_infinity")  # protocols with fid_extrapolate_to (standard), since session 70
PAIRED = ("l1", "psnr", "brightness_agreement", "size_agreement")  # the pix2pix and t2i families' own measures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="standard")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "quality.json")
    parser.add_argument("--variant", type=Path, help="an ae_variants.sh work directory: its LDM only")
    parser.add_argument("--upstream", type=Path, default=REPO, help="the project whose reference statistics it used")
    parser.add_argument("--recipe", default="default (params.yaml)")
    parser.add_argument("--overrides", default="")
    parser.add_argument("--sweep", type=Path, help="a directory with eval/<protocol>/ldm_guidance.json (ldm_variants.sh's)")
    parser.add_argument("--profile", default="default", help="the rows' profile: default, or quality for profiles/ldm-quality.yaml")
    parser.add_argument("--project", type=Path, help="a project: its metrics/eval and models/<family> (and its reference's floor)")
    parser.add_argument("--family", choices=("gan", "ldm", "pix2pix", "t2i"), help="one family only (pix2pix and t2i: only with --family)")
    parser.add_argument("--train-wall-s", type=float, help="the training's wall-clock, read from its log (train_wall_s)")
    parser.add_argument("--generator", type=Path, help="the export's directory (default <project>/models/<family>)")
    parser.add_argument("--evaluated", type=Path, help="the evaluate records' directory (default <project>/metrics/eval)")
    args = parser.parse_args()
    if args.sweep:
        return sweep_rows(args)
    project = args.project or REPO
    floor = json.loads(((args.project or args.upstream) / "data/ref_stats" / args.protocol / "floor.json").read_text())
    rows = json.loads(args.out.read_text())
    for family in ("ldm",) if args.variant else (args.family,) if args.family else ("gan", "ldm"):
        evaluated = args.variant / "eval" if args.variant else args.evaluated or project / "metrics/eval"
        record = json.loads((evaluated / args.protocol / f"{family}.json").read_text())
        generator = args.variant / family if args.variant else args.generator or project / "models" / family
        meta = json.loads((generator / "generator.json").read_text())
        step = meta.get("step")
        extra = {"guidance": record.get("guidance_scale"), "sampler": record.get("sampler"), "steps": record.get("sampler_steps"),
                 **interval(record)} if family in ("ldm", "t2i") else {}  # fmt: skip
        extra |= {k: record[k] for k in PAIRED + EXTRAPOLATED if k in record}
        if args.train_wall_s:
            extra |= training_extent(meta, family, step, args.train_wall_s)
        if args.variant:
            autoencoder = json.loads((args.variant / "autoencoder.json").read_text())
            extra |= {"autoencoder_psnr_db": autoencoder["psnr_db"], "autoencoder_rfid": autoencoder["fid"], "autoencoder_rfid_images": autoencoder["fid_images"]}
        row = {
            "family": family, "recipe": args.recipe, "overrides": args.overrides.split(), "profile": args.profile, **extra,
            "protocol": {"name": args.protocol, "id": record["protocol_id"], "num_samples": record["num_samples"]},
            "exported_step": step, **{k: record[k] for k in METRICS}, "fid_floor": floor["fid"], "recall_floor": floor["recall"],
            **provenance(args.note),
        }  # fmt: skip
        rows = with_row(rows, row)
        print(family, json.dumps({k: row[k] for k in ("fid", "kid", "precision", "recall", "class_accuracy", "classes_covered", "exported_step")}))
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


def sweep_rows(args) -> None:
    """One row per scale of a guidance sweep: the same weights, seeds and sampler at each guidance."""
    evaluated = args.sweep / "eval" if (args.sweep / "eval").is_dir() else args.sweep / "metrics/eval"
    sweep = json.loads((evaluated / args.protocol / "ldm_guidance.json").read_text())
    rows = json.loads(args.out.read_text())
    extra = {}
    if args.train_wall_s:
        if args.generator is None:
            sys.exit("quality_rows: --train-wall-s with --sweep needs --generator (the swept export, for its batch size)")
        extra = training_extent(json.loads((args.generator / "generator.json").read_text()), "ldm", sweep["step"], args.train_wall_s)
    for point in sweep["curve"]:
        recipe = f"{args.recipe} g{point['guidance']:g}"
        row = {
            "family": "ldm", "recipe": recipe, "overrides": args.overrides.split(), "profile": args.profile,
            "protocol": {"name": sweep["protocol"], "id": sweep["protocol_id"], "num_samples": int(sweep["protocol_id"].split(":")[1].split("-")[0])},
            "exported_step": sweep["step"], "guidance": point["guidance"], "sampler": sweep["sampler"], "steps": sweep["sampler_steps"], **interval(sweep), **extra,
            **{k: point[k] for k in METRICS}, **{k: point[k] for k in EXTRAPOLATED if k in point},
            "fid_floor": sweep["floor"]["fid"], "recall_floor": sweep["floor"]["recall"], "how": SWEEP_COMMAND, **provenance(args.note),
        }  # fmt: skip
        rows = with_row(rows, row)
        print(recipe, json.dumps({k: row[k] for k in ("fid", "kid", "precision", "recall", "class_accuracy", "exported_step")}))
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


SWEEP_COMMAND = "python -m pipelines.evaluate --family ldm --guidance-sweep"


def interval(record: dict) -> dict:
    """{"guidance_interval": [lo, hi]} where the model was guided in a noise interval only; {} where at every step."""
    return {"guidance_interval": record["guidance_interval"]} if record.get("guidance_interval") else {}


def training_extent(meta: dict, family: str, step: int, train_wall_s: float) -> dict:
    """train_wall_s and images_seen: the exported step times the batch its export's config trained with."""
    return {"train_wall_s": train_wall_s, "images_seen": step * meta["config"][family]["global_batch_size"]}


def provenance(note: str) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "commit": commit, "note": note}


def machine() -> str:
    """e.g. "x86_64, AMD EPYC, 2 cores"."""
    return f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores"


def with_row(rows: list[dict], row: dict) -> list[dict]:
    """`rows` with `row` in place of the one of the same family, recipe, profile and protocol."""
    key = lambda r: (r["family"], r.get("recipe"), r.get("profile"), r["protocol"]["name"])  # noqa: E731
    return [r for r in rows if key(r) != key(row)] + [row]


if __name__ == "__main__":
    main()
