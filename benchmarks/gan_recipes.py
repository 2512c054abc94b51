"""GAN recipes side by side at equal wall-clock: each recipe trains with the real `train_gan` stage for a
step count that fills the same time budget, then the real `evaluate` stage measures it under the chosen
protocol with that protocol's real-vs-real floor. Rows go to benchmarks/quality.json (one object per
row, replacing a row of the same family/recipe/profile/protocol) and a markdown table is printed.

    python benchmarks/gan_recipes.py --budget-s 300 --recipes dcgan-hinge,dcgan-hinge-diffaug
    python benchmarks/gan_recipes.py --list

Equal wall-clock: before training, every recipe's D+G step runs 15 times in this process (the bare loop
of benchmarks/gan_throughput.py, the layout and precision the stage uses) and the step count is
budget x img/s / batch, so the runs are deterministic and the budget is met to the probe's accuracy.
`train_wall_s` is the stage's own training time ("finished N steps in Xs"), Ray start-up excluded.
Needs the prepare, classifier and ref_stats outputs of the params in use (`dvc repro ref_stats`).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from benchmarks.suite_profile import cpu_model  # noqa: E402
from gan_throughput import bare_loop  # noqa: E402

from gen_core.config import load_config  # noqa: E402

AUGMENT = "[color,translation,cutout]"
RPGAN = ["gan.loss=rpgan", "gan.regularization.r1_gamma=1.0", "gan.regularization.r2_gamma=1.0"]
# one factor at a time from the seed's recipe (dcgan-hinge), then combinations
RECIPES: dict[str, list[str]] = {
    "dcgan-hinge": [],
    "dcgan-hinge-diffaug": [f"gan.augment={AUGMENT}"],
    "dcgan-hinge-mbstd": ["gan.model.mbstd_group=4"],
    "dcgan-hinge-diffaug-mbstd": [f"gan.augment={AUGMENT}", "gan.model.mbstd_group=4"],
    "dcgan-nonsaturating": ["gan.loss=nonsaturating"],
    "dcgan-wgan-gp": ["gan.loss=wgan", "gan.regularization.gp_lambda=10.0", "gan.model.spectral_norm=false"],
    "dcgan-rpgan-r1r2": RPGAN,
    "dcgan-rpgan-r1r2-lazy4": RPGAN + ["gan.regularization.interval=4"],
    "dcgan-rpgan-r1r2-diffaug": RPGAN + [f"gan.augment={AUGMENT}"],
    "resnet-hinge": ["gan.model.arch=resnet", "gan.model.g_width=16", "gan.model.d_width=16"],
    "resnet-hinge-diffaug": ["gan.model.arch=resnet", "gan.model.g_width=16", "gan.model.d_width=16", f"gan.augment={AUGMENT}"],
    "resnet-hinge-mbstd": ["gan.model.arch=resnet", "gan.model.g_width=16", "gan.model.d_width=16", "gan.model.mbstd_group=4"],
    "resnet-hinge-diffaug-mbstd": ["gan.model.arch=resnet", "gan.model.g_width=16", "gan.model.d_width=16", f"gan.augment={AUGMENT}",
                                   "gan.model.mbstd_group=4"],
    "resnet-rpgan-r1r2": ["gan.model.arch=resnet", "gan.model.g_width=16", "gan.model.d_width=16"] + RPGAN,
    "resnet-wgan-gp": ["gan.model.arch=resnet", "gan.model.g_width=16", "gan.model.d_width=16", "gan.loss=wgan",
                       "gan.regularization.gp_lambda=10.0", "gan.model.spectral_norm=false"],
}


def overrides_for(recipe: str) -> list[str]:
    return RECIPES[recipe]


def probe_img_s(params: Path, overlays: list[str], sets: list[str]) -> float:
    cfg = load_config(params, sets, overlays)
    return bare_loop(cfg, 15, False, cfg.ray.cpus_per_worker * cfg.ray.num_workers, "channels_last")


def run(cmd: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if code:
        raise SystemExit(f"{cmd[2]} failed (exit {code}); see {log}")
    return time.monotonic() - started


def training_seconds(log: str) -> float:
    """The stage's own training time from its "finished N steps in 12m03s" lines (Ray start-up excluded), summed:
    a resumed run prints one per leg."""
    found = re.findall(r"finished \d+ steps in (?:(\d+)m)?(\d+)s", log)
    return float(sum(int(m or 0) * 60 + int(s) for m, s in found)) if found else float("nan")


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="dcgan-hinge,dcgan-hinge-diffaug,dcgan-rpgan-r1r2-lazy4,dcgan-wgan-gp,resnet-hinge")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per recipe (this machine)")
    parser.add_argument("--profile", default="default", help="the name recorded in the rows (what params/overlays are)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--overlay", action="append", default=[])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra override for every recipe")
    parser.add_argument("--img-s", type=float, help="skip the probe and size every recipe for this rate (one measured by an earlier probe)")
    parser.add_argument("--eval-every", type=int, default=6, help="in-training evaluations per run (the curve)")
    parser.add_argument("--work", type=Path, default=REPO / "runs/gan_recipes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/quality.json")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--plot", type=Path, help="only plot the in-training curves of --out's rows of --profile to this PNG")
    parser.add_argument("--wall-from-logs", action="store_true",
                        help="only re-read train_wall_s (and the curve's seconds) of --out's rows from the logs under --work")  # fmt: skip
    parser.add_argument("--record", metavar="RECIPE", help="only add the row of a run the stages already made (with --train-log and "
                        "the run's --params/--overlay/--set), under this recipe name")  # fmt: skip
    parser.add_argument("--train-log", type=Path, action="append", default=[],
                        help="with --record: the train_gan stage's console output (repeat for each leg of a resumed run)")  # fmt: skip
    args = parser.parse_args()
    if args.record:
        record(args)
        return
    if args.wall_from_logs:
        rescan_wall(args.out, args.work)
        return
    if args.plot:
        plot_curves(json.loads(args.out.read_text()), args.profile, args.plot)
        return
    if args.list:
        for name, sets in RECIPES.items():
            print(f"{name:28s} {' '.join(sets) or '(params as they are)'}")
        return
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown[0]!r} (--list shows them)")

    base = load_config(args.params, args.sets, args.overlay)
    batch = base.gan.global_batch_size
    print(f"probing img/s of {0 if args.img_s else len(recipes)} recipes (bare D+G step, {base.ray.cpus_per_worker * base.ray.num_workers} threads)", flush=True)
    rates = {r: args.img_s or probe_img_s(args.params, args.overlay, args.sets + overrides_for(r)) for r in recipes}
    for recipe in recipes:
        steps = max(int(args.budget_s * rates[recipe] / batch), 1)
        every = max(steps // args.eval_every, 1)
        work = args.work / recipe
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        common = ["--params", str(args.params), *sum((["--overlay", o] for o in args.overlay), [])]
        sets = args.sets + overrides_for(recipe) + [
            f"gan.total_steps={steps}", f"gan.evaluation.every_steps={every}", f"gan.checkpoint_every_steps={every}",
            f"ray.storage_path={work}/runs", f"outputs.gan.out_dir={work}/gan", f"outputs.gan.losses_file={work}/losses.csv",
            f"outputs.gan.eval_file={work}/eval.csv", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", f"evaluate.out_dir={work}/eval",
        ]  # fmt: skip
        flags = common + sum((["--set", s] for s in sets), [])
        log = work / "log.txt"
        print(f"{recipe}: {rates[recipe]:.0f} img/s probed -> {steps} steps ({steps * batch} images), evaluating every {every}", flush=True)
        run([sys.executable, "-m", "pipelines.train_gan", *flags], log)
        run([sys.executable, "-m", "pipelines.evaluate", "--family", "gan", *flags], log)
        cfg = load_config(args.params, sets, args.overlay)
        row = make_row(recipe, args.profile, cfg, json.loads(next((work / "eval").rglob("gan.json")).read_text()), log.read_text(),
                       (work / "eval.csv").read_text())  # fmt: skip
        shutil.copy(work / "gan/samples.png", work / f"{recipe}.png")
        save_row(args.out, row)
    print_table(json.loads(args.out.read_text()))


def make_row(recipe: str, profile: str, cfg, metrics: dict, train_log: str, eval_csv: str) -> dict:
    """One quality.json row from what the stages wrote: the evaluate record, the training log (its
    "finished N steps in ..." line) and the in-training evaluation curve."""
    batch, steps, train_wall = cfg.gan.global_batch_size, cfg.gan.total_steps, training_seconds(train_log)
    curve = [{"step": int(row["step"]), "images": int(row["step"]) * batch, "train_s": round(int(row["step"]) / steps * train_wall, 1),
              **{k: float(row[k]) for k in ("fid_classifier", "recall_classifier", "class_accuracy", "diversity") if row.get(k)}}
             for row in csv.DictReader(eval_csv.splitlines())]  # fmt: skip
    protocol = cfg.evaluate.active
    row = {
        "family": "gan", "recipe": recipe, "overrides": overrides_for(recipe), "profile": profile,
        "protocol": {"name": cfg.evaluate.protocol, "id": metrics["protocol_id"], "num_samples": protocol.num_samples,
                     "reference": f"{protocol.reference} split, {protocol.reference_images or cfg.data.eval_images} images",
                     "inception": protocol.inception_precision},
        "train_wall_s": train_wall, "images_seen": steps * batch, "exported_step": metrics["step"],
        **{k: metrics.get(k) for k in ("fid", "kid", "precision", "recall", "class_accuracy", "fid_classifier", "diversity", "classes_covered")},
        "fid_floor": metrics["floor"].get("fid"), "recall_floor": metrics["floor"].get("recall"),
        "curve": curve, "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(), "commit": git_commit(),
    }  # fmt: skip
    print(f"{recipe}: fid {row['fid']:.1f} [floor {row['fid_floor']:.1f}] recall {row['recall']:.3f} precision {row['precision']:.3f} "
          f"class acc {row['class_accuracy']:.3f} ({train_wall:.0f} s training, {steps} steps)", flush=True)  # fmt: skip
    return row


def save_row(out: Path, row: dict) -> None:
    """Add `row` to quality.json, replacing a row of the same family, recipe, profile and protocol."""
    rows = json.loads(out.read_text()) if out.exists() else []
    key = lambda r: (r["family"], r["recipe"], r["profile"], r["protocol"]["id"])  # noqa: E731
    out.write_text(json.dumps([r for r in rows if key(r) != key(row)] + [row], indent=1) + "\n")


def record(args: argparse.Namespace) -> None:
    """--record RECIPE: a row for a run the stages made themselves (e.g. a profile's `train_gan` + `evaluate`
    with --overlay), from its training log, its in-training curve (outputs.gan.eval_file) and its evaluate record."""
    cfg = load_config(args.params, args.sets, args.overlay)
    metrics = json.loads(Path(cfg.eval_file("gan")).read_text())
    logs = "".join(path.read_text() for path in args.train_log)
    save_row(args.out, make_row(args.record, args.profile, cfg, metrics, logs, Path(cfg.outputs.gan.eval_file).read_text()))
    print_table(json.loads(args.out.read_text()))


def rescan_wall(out: Path, work: Path) -> None:
    rows = json.loads(out.read_text())
    for row in rows:
        log = work / row["recipe"] / "log.txt"
        if log.exists():
            row["train_wall_s"] = training_seconds(log.read_text())
            steps = row["images_seen"] // (row["curve"][0]["images"] // row["curve"][0]["step"])
            for point in row["curve"]:
                point["train_s"] = round(point["step"] / steps * row["train_wall_s"], 1)
    out.write_text(json.dumps(rows, indent=1) + "\n")


def plot_curves(rows: list[dict], profile: str, path: Path) -> None:
    """Classifier-feature FID and recall during training against training seconds, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fid, ax_recall) = plt.subplots(1, 2, figsize=(11, 4))
    for row in (r for r in rows if r["family"] == "gan" and r["profile"] == profile):
        seconds = [p["train_s"] for p in row["curve"]]
        ax_fid.plot(seconds, [p["fid_classifier"] for p in row["curve"]], marker="o", label=f"{row['recipe']} (FID {row['fid']:.1f})")
        ax_recall.plot(seconds, [p["recall_classifier"] for p in row["curve"]], marker="o", label=row["recipe"])
    ax_fid.set(xlabel="training seconds (2-core CPU)", ylabel="classifier-feature FID (500 samples)", yscale="log", title=f"{profile}: FID during training")
    ax_recall.set(xlabel="training seconds (2-core CPU)", ylabel="classifier-space recall (500 samples)", title="recall during training")
    ax_fid.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def print_table(rows: list[dict]) -> None:
    print("| recipe | profile | protocol | train s | images | FID [floor] | KID | precision | recall | class acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["family"] == "gan"):
        seconds = f"{r['train_wall_s']:.0f}" if r.get("train_wall_s") is not None else "-"  # the default run's rows have none
        print(f"| {r['recipe']} | {r['profile']} | {r['protocol']['id']} | {seconds} | {r.get('images_seen', '-')} | "
              f"{r['fid']:.1f} [{r['fid_floor']:.1f}] | {r['kid']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
