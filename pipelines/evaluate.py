"""Stage `evaluate`: a generator's metrics under the evaluation protocol in use (evaluate.protocol), each
with the protocol's real-vs-real floor: FID, KID, precision/recall, classifier-feature FID, class accuracy,
classifier score, and per class recall, diversity and classifier FID.

    python -m pipelines.evaluate --family gan|ldm [--model models:/genforge-gan@champion] [--set evaluate.protocol=standard]

The same stage for every model family (pipelines.evaluation). Writes <evaluate.out_dir>/<protocol>/<family>.json
(DVC metrics) and logs the metrics to the model's training run in MLflow. `--model` evaluates a registered
version (its safetensors and JSON files only) instead of the family's export; `make eval-standard` runs
the champions at the standard protocol.
"""

from __future__ import annotations

import tempfile

from pipelines.common import family_parser, run_stage
from pipelines.evaluation import evaluate


def run(cfg, args) -> None:
    if not args.model:
        evaluate(cfg, args.family)
        return
    import mlflow

    from pipelines.tracking import connect

    connect(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{args.model.rstrip('/')}/artifacts/generator", dst_path=tmp)
        outputs = cfg.outputs.model_copy(update={args.family: getattr(cfg.outputs, args.family).model_copy(update={"out_dir": local})})
        evaluate(cfg.model_copy(update={"outputs": outputs}), args.family, model_uri=args.model)


def main() -> None:
    parser = family_parser("genforge evaluate stage", "evaluate")
    parser.add_argument("--model", help="a registered version to evaluate instead of the export, e.g. models:/genforge-gan@champion")
    run_stage("evaluate", run, parser)


if __name__ == "__main__":
    main()
