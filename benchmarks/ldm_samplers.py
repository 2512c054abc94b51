"""Few-step sampling against the full chain: one trained LDM, the evaluate stage at each sampler and step count.

    python benchmarks/ldm_samplers.py --model models/ldm --upstream . --tracking sqlite:///mlflow.db --guidance 3 \
        --samplers ddim:50,dpmsolver++:10,dpmsolver++:25,dpmsolver++:50,ddpm:1000

For each NAME:STEPS the exported model is copied with its generator.json's sampler set to NAME, STEPS and the
guidance, and `python -m pipelines.evaluate --family ldm` measures it at the params' protocol (same weights, same
seeds, same reference statistics from UPSTREAM's make repro). Prints a table with each sampler's FID relative to the
last one given (the reference: the full DDPM chain), and writes the rows to --out (JSON).

NAME:STEPS:SPACING places the steps otherwise than the product's samplers do (dpmsolver++ uniform in t, heun on
Karras et al.'s noise levels): `logsnr` uniform in lambda = ln(alpha_t / sigma_t) (dpmsolver++'s use_lu_lambdas, heun's
use_exponential_sigmas), `karras` on Karras et al.'s rho-7 noise levels. The evaluate process gets them by patching
gen_core.diffusers_pipeline.SAMPLER_OPTIONS before it runs; the product has no such setting (RESULTS.md, session 64:
neither spacing beat uniform-in-t on the quality profile's model).

    python benchmarks/ldm_samplers.py --gaussian      # the spacings on data N(0, s^2) with the exact network: the spread kept

--grid PNG draws what was measured: one row per sampler, one image per class, the same seeds in every row, each from the
copy of the model that `measure` left in --work with that sampler set (without --model, from an earlier run's copies):

    python benchmarks/ldm_samplers.py --samplers ddim:50,dpmsolver++:10,ddpm:1000 --grid benchmarks/ldm_samplers.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from gen_core.diffusers_pipeline import log_sigmas, timestep_sigma
from pipelines.tracking import absolute_sqlite

REPO = Path(__file__).resolve().parent.parent
SPACINGS = {"dpmsolver++": {"logsnr": {"use_lu_lambdas": True}, "karras": {"use_karras_sigmas": True}},
            "heun": {"logsnr": {"use_karras_sigmas": False, "use_exponential_sigmas": True}}}  # fmt: skip
# runs the evaluate stage with the sampler's options patched: argv[1] the options (JSON), the rest evaluate's arguments
PATCHED_EVALUATE = """import json, runpy, sys
import gen_core.diffusers_pipeline as dp
name, options = json.loads(sys.argv.pop(1))
dp.SAMPLER_OPTIONS[name] = {**dp.SAMPLER_OPTIONS.get(name, {}), **options}
sys.argv[0] = "pipelines.evaluate"
runpy.run_module("pipelines.evaluate", run_name="__main__", alter_sys=True)
"""


class GaussianEpsilon(torch.nn.Module):
    """The exact epsilon network for data N(0, scale^2 I), called as the samplers call a denoiser; with `error`, plus
    seeded noise of that std on its output: a good network's small mistakes."""

    def __init__(self, schedule_config, scale: float, error: float = 0.0, seed: int = 11):
        super().__init__()
        self.log_sigmas, self.scale, self.error = log_sigmas(schedule_config).double(), scale, error
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x, timestep, class_labels=None, return_dict=False):
        abar = 1 / (1 + timestep_sigma(self.log_sigmas, timestep).double().view(-1, 1, 1, 1) ** 2)
        exact = (1 - abar).sqrt() * x.double() / (abar * self.scale**2 + 1 - abar)
        if self.error:
            exact = exact + self.error * torch.randn(x.shape, generator=self.generator, dtype=torch.float64)
        return (exact.float(),)


def scheduler_options(sampler: str, spacing: str | None) -> dict:
    if spacing is None:
        return {}
    if spacing not in SPACINGS.get(sampler, {}):
        raise SystemExit(f"spacing {spacing!r}: {sampler} takes {', '.join(SPACINGS.get(sampler, {})) or 'none'}")
    return SPACINGS[sampler][spacing]


@contextlib.contextmanager
def spaced(sampler: str, spacing: str | None):
    """In this process, `sampler` steps with `spacing`'s scheduler options on top of the product's, restored after."""
    import gen_core.diffusers_pipeline as dp

    product = dp.SAMPLER_OPTIONS.get(sampler, {})
    dp.SAMPLER_OPTIONS[sampler] = {**product, **scheduler_options(sampler, spacing)}
    try:
        yield
    finally:
        dp.SAMPLER_OPTIONS[sampler] = product


def gaussian_spread(steps=(10, 25), scales=(0.1, 0.25, 0.5, 1.0), n: int = 32) -> None:
    """Each sampler/spacing on data N(0, s^2 I) with the exact epsilon network, unguided: the samples' std over s. The
    probability-flow ODE keeps it at 1; a coarse last step (dpmsolver++ uniform in t ends at t = 100 of 1000 and jumps to
    the data prediction there) shrinks the small-scale components, as a blur does."""
    from gen_core.config import NoiseScheduleConfig
    from gen_core.diffusion import sample_diffusion, training_schedule

    print("| schedule | sampler | spacing | " + " | ".join(f"s {s}, {k} steps" for s in scales for k in steps) + " |")
    print("|---|---|---|" + "---|" * (len(scales) * len(steps)))
    for schedule in ("linear", "squaredcos_cap_v2"):
        config = dict(training_schedule(NoiseScheduleConfig(beta_schedule=schedule)).config)
        for sampler, spacing in (("dpmsolver++", None), ("dpmsolver++", "logsnr"), ("dpmsolver++", "karras"), ("heun", None), ("heun", "logsnr")):
            ratios = []
            with spaced(sampler, spacing):
                for scale in scales:
                    for k in steps:
                        try:
                            out = sample_diffusion(GaussianEpsilon(config, scale), config, torch.zeros(n, dtype=torch.long), list(range(n)), (4, 8, 8), 10, sampler, k, 1.0)
                            ratios.append(f"{float(out.std()) / scale:.3f}")
                        except IndexError:  # diffusers 0.42: dpmsolver++ on Karras sigmas of the cosine schedule steps past its last sigma
                            ratios.append("IndexError")
            print(f"| {schedule} | {sampler} | {spacing or 'product'} | " + " | ".join(ratios) + " |")


def measure(model: Path, upstream: Path, work: Path, tracking: str, sampler: str, steps: int, guidance: float, spacing: str | None = None,
            protocol: str | None = None) -> dict:
    directory = copy_dir(work, sampler, steps, spacing)
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(model, directory / "ldm")
    meta_path = directory / "ldm" / "generator.json"
    meta = json.loads(meta_path.read_text())
    meta["sampler"] = {**meta["sampler"], "name": sampler, "num_steps": steps, "guidance_scale": guidance}
    meta_path.write_text(json.dumps(meta, indent=2))
    sets = {"outputs.ldm.out_dir": directory / "ldm", "evaluate.out_dir": directory / "eval", "data.out_dir": upstream / "data/prepared",
            "classifier.out_dir": upstream / "models/classifier", "ref_stats.out_dir": upstream / "data/ref_stats",
            "tracking.tracking_uri": tracking, **({"evaluate.protocol": protocol} if protocol else {})}  # fmt: skip
    options = scheduler_options(sampler, spacing)
    command = [sys.executable, "-c", PATCHED_EVALUATE, json.dumps([sampler, options])] if options else [sys.executable, "-m", "pipelines.evaluate"]
    command += ["--family", "ldm"]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    started = time.monotonic()
    with open(directory / "evaluate.log", "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.monotonic() - started
    record = json.loads(next((directory / "eval").rglob("ldm.json")).read_text())
    return {"sampler": sampler, "steps": steps, **({"spacing": spacing} if spacing else {}), "guidance": guidance, "wall_s": round(wall, 1), "protocol": record.get("protocol_id"),
            **{k: record[k] for k in ("fid", "kid", "precision", "recall", "class_accuracy")}, "fid_floor": record["floor"]["fid"]}  # fmt: skip


def copy_dir(work: Path, sampler: str, steps: int, spacing: str | None = None) -> Path:
    return work / f"{sampler}-{steps}" if spacing is None else work / f"{sampler}-{steps}-{spacing}"


def sampler_grid(work: Path, specs: list[tuple[str, int, str | None]], seed: int, out: Path) -> None:
    """One row per sampler of the copies in `work`: class c's image from seed + c in every row, at the precision the
    evaluate stage samples in here (`precision: auto`)."""
    from gen_core.diffusion import DiffusionGenerator
    from gen_core.sampling import image_grid, png_bytes, to_uint8
    from gen_core.training import autocast_dtype

    rows, dtype = [], autocast_dtype("auto", torch.device("cpu"))
    for sampler, steps, spacing in specs:
        generator, _ = DiffusionGenerator.from_pretrained(copy_dir(work, sampler, steps, spacing) / "ldm")
        labels = torch.arange(generator.num_classes)
        with spaced(sampler, spacing):
            rows.append(to_uint8(generator.sample(labels, [seed + int(c) for c in labels], autocast_dtype=dtype).cpu()))
        print(f"grid: {sampler} {steps}{' ' + spacing if spacing else ''}", flush=True)
    out.write_bytes(png_bytes(image_grid(torch.cat(rows), rows=len(rows))))
    print(f"grid -> {out} (rows: {', '.join(f'{name} {steps}' for name, steps, _ in specs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussian", action="store_true", help="only the spacings' spread on Gaussian data (no model, seconds)")
    parser.add_argument("--model", type=Path, help="an exported LDM directory (outputs.ldm.out_dir)")
    parser.add_argument("--upstream", type=Path, help="the project whose data, classifier and ref_stats to use")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ldm_samplers"))
    parser.add_argument("--tracking", help="the MLflow store the model was trained with (evaluate logs to its run)")
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--protocol", help="evaluate.protocol (default: params.yaml's); `standard` needs UPSTREAM's standard ref_stats")
    parser.add_argument("--samplers", default="ddim:50,dpmsolver++:10,dpmsolver++:25,dpmsolver++:50,ddpm:1000",
                        help="NAME:STEPS[:SPACING],...; the last one is the reference")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "ldm_samplers.json")
    parser.add_argument("--grid", type=Path, help="a PNG: one row per sampler, one image per class (without --model: from --work's copies)")
    parser.add_argument("--grid-seed", type=int, default=1234)
    args = parser.parse_args()
    if args.gaussian:
        return gaussian_spread()
    specs = [(name, int(steps), spacing[0] if spacing else None) for name, steps, *spacing in (spec.split(":") for spec in args.samplers.split(","))]
    if args.grid and args.model is None:
        return sampler_grid(args.work, specs, args.grid_seed, args.grid)
    if None in (args.model, args.upstream, args.tracking, args.guidance):
        parser.error("--model, --upstream, --tracking and --guidance are required (or --gaussian)")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    store = absolute_sqlite(args.tracking, lambda path: str(Path(path).resolve()))  # the evaluate processes run in this checkout
    for name, steps, spacing in specs:
        rows.append(measure(args.model.resolve(), args.upstream.resolve(), args.work, store, name, steps, args.guidance, spacing, args.protocol))
        print(json.dumps(rows[-1]), flush=True)
    reference = rows[-1]["fid"]
    print(f"\n| sampler | steps | spacing | FID [floor {rows[-1]['fid_floor']:.1f}] | vs {rows[-1]['sampler']} {rows[-1]['steps']} | recall | precision | class acc | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['sampler']} | {row['steps']} | {row.get('spacing', 'product')} | {row['fid']:.1f} | {100 * (row['fid'] / reference - 1):+.1f}% | {row['recall']:.3f} | "
              f"{row['precision']:.3f} | {row['class_accuracy']:.3f} | {row['wall_s']:.0f} |")  # fmt: skip
    args.out.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2) + "\n")
    if args.grid:
        sampler_grid(args.work, specs, args.grid_seed, args.grid)


if __name__ == "__main__":
    main()
