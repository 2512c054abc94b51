"""Stage `evaluate`: a generator's metrics under the evaluation protocol in use (evaluate.protocol), each
with the protocol's real-vs-real floor: FID, KID, precision/recall, classifier-feature FID, class accuracy,
classifier score, and per class recall, diversity and classifier FID.

    python -m pipelines.evaluate --family gan|ldm [--model models:/genforge-gan@champion] [--set evaluate.protocol=standard]
    python -m pipelines.evaluate --family ldm --guidance-sweep [--set evaluate.guidance.scales=[1,2,4]]

The same stage for every model family (pipelines.evaluation). Writes <evaluate.out_dir>/<protocol>/<family>.json
(DVC metrics) and logs the metrics to the model's training run in MLflow. `--model` evaluates a registered
version (its safetensors and JSON files only) instead of the family's export; `make eval-standard` runs
the champions at the standard protocol. `--guidance-sweep` measures a diffusion model at each of
evaluate.guidance.scales instead and names the lowest-FID scale that keeps class accuracy at
evaluate.guidance.class_accuracy_floor: <out_dir>/<protocol>/<family>_guidance.json and .png.

A diffusion model is measured as it samples (its generator.json's sampler, written from <family>.sampler when it
was trained): a --set of <family>.sampler on this command that differs from the model's is refused in one line
rather than ignored.
"""

from __future__ import annotations

import tempfile

from gen_core.config import SamplerConfig, parse_override
from gen_core.generators import read_generator_meta
from pipelines.common import StageError, family_parser, run_stage
from pipelines.evaluation import evaluate, guidance_sweep


def refuse_an_unused_sampler(cfg, family: str, overrides: list[str]) -> None:
    """A --set of <family>.sampler on this command that differs from the export's sampler would go unused (the export
    samples as exported), so it is refused, naming the fields and how to measure them instead."""
    if not any(parse_override(override)[0][:2] == [family, "sampler"] for override in overrides):
        return
    configured = getattr(cfg, family).sampler
    exported = SamplerConfig(**read_generator_meta(cfg.generator_dir(family))["sampler"])
    differ = [f"{k} {getattr(configured, k)!r} (the export's: {getattr(exported, k)!r})"
              for k in SamplerConfig.model_fields if getattr(configured, k) != getattr(exported, k)]  # fmt: skip
    if differ:
        raise StageError(
            f"{family}.sampler: {', '.join(differ)}: evaluate measures the export as it samples; export it with this "
            f"sampler first (python -m pipelines.train_{family} with the same setting resumes its finished run and "
            f"re-exports), or measure other guidance scales on these weights with --guidance-sweep --set evaluate.guidance.scales=[...]"
        )


def run(cfg, args) -> None:
    measure = guidance_sweep if args.guidance_sweep else evaluate
    if not args.model:
        refuse_an_unused_sampler(cfg, args.family, args.overrides)
        measure(cfg, args.family)
        return
    import mlflow

    from pipelines.tracking import connect

    connect(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{args.model.rstrip('/')}/artifacts/generator", dst_path=tmp)
        outputs = cfg.outputs.model_copy(update={args.family: getattr(cfg.outputs, args.family).model_copy(update={"out_dir": local})})
        measured = cfg.model_copy(update={"outputs": outputs})
        refuse_an_unused_sampler(measured, args.family, args.overrides)
        measure(measured, args.family) if args.guidance_sweep else evaluate(measured, args.family, model_uri=args.model)


def main() -> None:
    parser = family_parser("genforge evaluate stage", "evaluate")
    parser.add_argument("--model", help="a registered version to evaluate instead of the export, e.g. models:/genforge-gan@champion")
    parser.add_argument("--guidance-sweep", action="store_true",
                        help="a diffusion model at each of evaluate.guidance.scales (same weights and seeds): <family>_guidance.json + .png")  # fmt: skip
    run_stage("evaluate", run, parser)


if __name__ == "__main__":
    main()
