"""Stage `classifier`: a small CNN on the train split; its eval accuracy is a DVC metric.

Outputs: <out_dir>/classifier.safetensors + classifier.json, and <metrics_file> (DVC metrics).
"""

from __future__ import annotations

import torch

from gen_core.classifier import classify, save_classifier, train_classifier
from gen_core.config import RunConfig
from gen_core.data import load_split
from gen_core.io import atomic_write_json
from pipelines.common import log, run_stage



def run(cfg: RunConfig) -> dict:
    logger = log("classifier")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train = load_split(cfg.data.out_dir, "train")
    evals = load_split(cfg.data.out_dir, "eval")
    report_every = max(1, cfg.classifier.steps // 5)

    def progress(step: int, loss: float) -> None:
        if step % report_every == 0 or step == cfg.classifier.steps:
            logger.info("step %d/%d loss %.4f", step, cfg.classifier.steps, loss)

    model = train_classifier(torch.from_numpy(train.images), torch.from_numpy(train.labels), train.num_classes, cfg.classifier, progress)
    predictions, _ = classify(model, torch.from_numpy(evals.images))
    accuracy = float((predictions == evals.labels).mean())
    meta = {
        "channels": int(train.images.shape[1]), "num_classes": train.num_classes, "width": cfg.classifier.width,
        "feature_dim": cfg.classifier.feature_dim, "class_names": train.class_names, "eval_accuracy": accuracy,
    }  # fmt: skip
    save_classifier(cfg.classifier.out_dir, model, meta)
    atomic_write_json(cfg.classifier.metrics_file, {"classifier_accuracy": accuracy})
    logger.info("eval accuracy %.4f on %d images -> %s", accuracy, len(evals.labels), cfg.classifier.out_dir)
    return meta


def main() -> None:
    run_stage("classifier", lambda cfg, args: run(cfg) and None)


if __name__ == "__main__":
    main()
