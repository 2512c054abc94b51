"""Stage `evaluate`: FID, KID, classifier-feature FID, class-conditional accuracy, precision/recall.

    python -m pipelines.evaluate --family gan|ldm

The same stage for every model family (pipelines.evaluation). Writes <evaluate.out_dir>/<family>.json
(DVC metrics) and logs the metrics to the model's training run in MLflow.
"""

from __future__ import annotations

from pipelines.common import family_parser, run_stage
from pipelines.evaluation import evaluate


def main() -> None:
    run_stage("evaluate", lambda cfg, args: evaluate(cfg, args.family) and None, family_parser("genforge evaluate stage"))


if __name__ == "__main__":
    main()
