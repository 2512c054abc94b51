"""Stage `ref_stats`: FID reference statistics of the eval split, computed once and cached by DVC.

Outputs <out_dir>/inception.npz and <out_dir>/classifier.npz: mu, sigma, the features themselves
(for KID and precision/recall) and the sha256 of the feature network.
"""

from __future__ import annotations

import time

import torch

from gen_core.classifier import classify
from gen_core.config import RunConfig
from gen_core.data import load_split
from gen_core.io import atomic_write_bytes, sha256_file
from gen_core.metrics import FeatureStats, inception_features, load_inception, save_ref_stats
from pipelines.classifier import load_classifier
from pipelines.common import format_duration, log, run_stage


def inception_stats(net, images_uint8: torch.Tensor, batch_size: int, logger=None) -> tuple[FeatureStats, "np.ndarray"]:
    import numpy as np

    stats, features = FeatureStats(2048), []
    started = time.monotonic()
    for start in range(0, len(images_uint8), batch_size):
        feats = inception_features(net, images_uint8[start : start + batch_size])
        stats.update(feats)
        features.append(feats.astype(np.float32))
        done = min(start + batch_size, len(images_uint8))
        if logger and (done == len(images_uint8) or (start // batch_size) % 5 == 4):
            rate = done / (time.monotonic() - started)
            logger.info("inception %d/%d images, %.1f img/s, eta %s", done, len(images_uint8), rate, format_duration((len(images_uint8) - done) / rate))
    return stats, np.concatenate(features)


def run(cfg: RunConfig) -> None:
    logger = log("ref_stats")
    evals = load_split(cfg.data.out_dir, "eval")
    images = torch.from_numpy(evals.images)
    net = load_inception(cfg.ref_stats.inception)
    stats, feats = inception_stats(net, images, cfg.ref_stats.inception.batch_size, logger)
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
