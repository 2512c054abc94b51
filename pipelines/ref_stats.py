"""Stage `ref_stats`: FID reference statistics of the eval split, computed once and cached by DVC.

Outputs <out_dir>/inception.npz and <out_dir>/classifier.npz: mu, sigma, the features themselves
(for KID and precision/recall) and the sha256 of the feature network.
"""

from __future__ import annotations

import torch

from gen_core.classifier import classify, load_classifier
from gen_core.config import RunConfig
from gen_core.data import load_split
from gen_core.io import atomic_write_bytes, sha256_file
from gen_core.metrics import FeatureStats, inception_stats, load_inception, save_ref_stats
from pipelines.common import inception_progress, log, run_stage


def run(cfg: RunConfig) -> None:
    logger = log("ref_stats")
    evals = load_split(cfg.data.out_dir, "eval")
    images = torch.from_numpy(evals.images)
    net = load_inception(cfg.ref_stats.inception)
    stats, feats = inception_stats(net, images, cfg.ref_stats.inception.batch_size, inception_progress(logger))
    atomic_write_bytes(f"{cfg.ref_stats.out_dir}/inception.npz", save_ref_stats(stats, feats, "inception-2015-12-05", net.sha256))

    classifier, _ = load_classifier(cfg.classifier.out_dir)
    _, cls_feats = classify(classifier, images)
    cls_stats = FeatureStats(cls_feats.shape[1])
    cls_stats.update(cls_feats)
    cls_sha = sha256_file(f"{cfg.classifier.out_dir}/classifier.safetensors")
    atomic_write_bytes(f"{cfg.ref_stats.out_dir}/classifier.npz", save_ref_stats(cls_stats, cls_feats, "classifier", cls_sha))
    logger.info("reference statistics of %d eval images -> %s", len(images), cfg.ref_stats.out_dir)


def main() -> None:
    run_stage("ref_stats", lambda cfg, args: run(cfg))


if __name__ == "__main__":
    main()
