"""Stage `ref_stats`: the evaluation protocol's reference statistics and its real-vs-real floor,
computed once and cached by DVC, in <ref_stats.out_dir>/<evaluate.protocol>/:

- inception.npz, classifier.npz: mu, sigma, the features themselves (for KID, precision/recall and the
  per-class metrics), their labels, the sha256 of the feature network and the protocol id;
- floor.json: every metric the evaluate stage reports, measured on as many real *training* images as
  the protocol generates (class-balanced, as the samples are) against the reference set. No generator
  can be expected to beat it at this sample size; reports show it next to each value.
"""

from __future__ import annotations

import numpy as np
import torch

from gen_core.classifier import classifier_outputs, load_classifier
from gen_core.config import RunConfig
from gen_core.data import DataError, load_split, reference_split
from gen_core.io import atomic_write_bytes, atomic_write_json, sha256_file
from gen_core.metrics import FeatureStats, inception_stats, load_inception, protocol_id, sample_metrics, save_ref_stats
from pipelines.common import inception_progress, log, run_stage


def floor_set(cfg: RunConfig) -> tuple[torch.Tensor, np.ndarray]:
    """`num_samples` real training images, image i of class i mod K (as generated samples are), seeded."""
    train = load_split(cfg.data.out_dir, "train")
    num_classes = train.num_classes
    rng = np.random.default_rng(cfg.evaluate.seed)
    count = cfg.evaluate.active.num_samples
    labels = np.arange(count) % num_classes
    pick = np.empty(count, np.int64)
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(train.labels == c))
        wanted = np.flatnonzero(labels == c)
        if len(members) < len(wanted):
            raise DataError(f"evaluate.protocols.{cfg.evaluate.protocol}: the floor needs {len(wanted)} training images of class {c}, there are {len(members)}")
        pick[wanted] = members[: len(wanted)]
    return torch.from_numpy(train.images[pick]), labels


def run(cfg: RunConfig) -> dict:
    logger = log("ref_stats")
    out = cfg.reference_dir
    classifier, _ = load_classifier(cfg.classifier.out_dir)
    cls_sha = sha256_file(f"{cfg.classifier.out_dir}/classifier.safetensors")
    net = load_inception(cfg.ref_stats.inception, precision=cfg.evaluate.active.inception_precision)
    reference = reference_split(cfg)
    images, labels = torch.from_numpy(reference.images), reference.labels
    pid = protocol_id(cfg.evaluate.protocol, cfg.evaluate.active, net.precision, len(labels))
    logger.info("protocol %s (Inception %s, %s backend)", pid, net.precision, net.backend)

    stats, feats = inception_stats(net, images, cfg.ref_stats.inception.batch_size, inception_progress(logger))
    _, cls_feats = classifier_outputs(classifier, images)
    cls_stats = FeatureStats(cls_feats.shape[1])
    cls_stats.update(cls_feats)
    inception_npz = save_ref_stats(stats, feats, "inception-2015-12-05", net.sha256, labels, pid)
    classifier_npz = save_ref_stats(cls_stats, cls_feats, "classifier", cls_sha, labels, pid)

    logger.info("real-vs-real floor: %d training images", cfg.evaluate.active.num_samples)
    real, real_labels = floor_set(cfg)
    _, real_feats = inception_stats(net, real, cfg.ref_stats.inception.batch_size, inception_progress(logger))
    probabilities, real_cls = classifier_outputs(classifier, real)
    reference = {
        "inception": {"mu": stats.mu, "sigma": stats.sigma, "features": feats.astype(np.float64), "labels": labels},
        "classifier": {"mu": cls_stats.mu, "sigma": cls_stats.sigma, "features": cls_feats, "labels": labels},
    }
    generated = {"inception": real_feats, "classifier": real_cls, "probabilities": probabilities, "labels": real_labels}
    floor = {**sample_metrics(reference, generated, cfg.evaluate), "protocol": cfg.evaluate.protocol, "protocol_id": pid,
             "reference_images": len(labels)}  # fmt: skip
    atomic_write_bytes(f"{out}/inception.npz", inception_npz)
    atomic_write_bytes(f"{out}/classifier.npz", classifier_npz)
    atomic_write_json(f"{out}/floor.json", floor)
    logger.info(
        "%d reference images -> %s; floor: fid %.2f  precision %.3f  recall %.3f  class_accuracy %.3f",
        len(labels), out, floor["fid"], floor["precision"], floor["recall"], floor["class_accuracy"],
    )  # fmt: skip
    if "fid_extrapolated" in floor:
        logger.info("floor fid at %d samples (extrapolated in 1/N): %.2f", floor["fid_extrapolated_to"], floor["fid_extrapolated"])
    return floor


def main() -> None:
    run_stage("ref_stats", lambda cfg, args: run(cfg) and None)


if __name__ == "__main__":
    main()
