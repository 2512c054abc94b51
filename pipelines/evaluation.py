"""Evaluating an exported generator: FID, KID, classifier-feature FID, class-conditional accuracy,
precision/recall. Used by the evaluate stage and by the sweep for its best trial.

The exported generator (gen_core.generators) says how it samples. Samples are generated on Ray
workers (one task per worker, each a strided share of sample indices, streamed in batches). Sample i
uses seed `evaluate.seed + i` and class i mod K, so the metrics do not depend on the number of workers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from gen_core.classifier import classify, load_classifier
from gen_core.config import InceptionConfig, RunConfig
from gen_core.generators import load_image_generator, read_generator_meta
from gen_core.io import atomic_write_json, sha256_file
from gen_core.metrics import (
    FeatureStats, fid_from_stats, inception_features, kid, load_inception, load_inception_reference, load_ref_stats, precision_recall,
)  # fmt: skip
from gen_core.sampling import balanced_labels, to_uint8
from gen_core.training import autocast_dtype
from pipelines.common import StageError, format_duration, log
from pipelines.ray_env import init_ray
from pipelines.tracking import connect, training_run


def features_for_indices(
    generator, classifier, inception, indices: np.ndarray, seed: int, batch_size: int, device, report=None, amp_dtype=None,
) -> dict:  # fmt: skip
    """Generate samples `indices` and return their Inception/classifier features and predictions."""
    inception_feats, classifier_feats, correct = [], [], 0
    num_classes = generator.num_classes
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        labels = balanced_labels(chunk, num_classes)
        images = to_uint8(generator.sample(labels, [seed + int(i) for i in chunk], device, autocast_dtype=amp_dtype).cpu())
        inception_feats.append(inception_features(inception, images).astype(np.float32))
        predictions, feats = classify(classifier, images)
        classifier_feats.append(feats.astype(np.float32))
        correct += int((predictions == labels.numpy()).sum())
        if report:
            report(min(start + batch_size, len(indices)), len(indices))
    return {
        "inception": np.concatenate(inception_feats), "classifier": np.concatenate(classifier_feats), "correct": correct,
    }  # fmt: skip


def _eval_task(generator_dir: str, classifier_dir: str, inception_cfg: dict, indices: np.ndarray, seed: int,
               batch_size: int, precision: str, threads: int, use_gpu: bool, worker: int) -> dict:  # fmt: skip
    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu else "cpu")
    generator, _ = load_image_generator(generator_dir)
    classifier, _ = load_classifier(classifier_dir)
    inception = load_inception(InceptionConfig(**inception_cfg), device)
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        rate = done / (time.monotonic() - started)
        sys.stdout.write(f"[evaluate] worker {worker}: {done}/{total} samples, {rate:.1f} img/s, eta {format_duration((total - done) / rate)}\n")
        sys.stdout.flush()

    amp_dtype = autocast_dtype(precision, device)
    return features_for_indices(generator.to(device), classifier.to(device), inception, indices, seed, batch_size, device, report, amp_dtype)


def evaluate(cfg: RunConfig, family: str) -> dict:
    """Sample the family's exported generator on Ray workers and measure it -> the metrics record,
    also written to <evaluate.out_dir>/<family>.json and logged to the model's training run."""
    logger = log("evaluate")
    e = cfg.evaluate
    generator_dir = str(Path(cfg.generator_dir(family)).resolve())
    classifier_dir = str(Path(cfg.classifier.out_dir).resolve())
    gen_meta = read_generator_meta(generator_dir)
    if gen_meta.get("family", "gan") != family:
        raise StageError(f"{generator_dir}: holds a {gen_meta.get('family')} model, not {family}")
    ref_inception, ref_classifier, feature_sha256 = _reference_stats(cfg, classifier_dir)
    mlflow = connect(cfg)  # before the sampling: the results go to the model's training run
    run_id = training_run(mlflow, gen_meta.get("mlflow_run_id"), generator_dir)

    parts = _sample_on_ray(cfg, generator_dir, classifier_dir, logger, family)
    inception_feats = np.concatenate([p["inception"] for p in parts]).astype(np.float64)
    classifier_feats = np.concatenate([p["classifier"] for p in parts]).astype(np.float64)
    inception_stats, classifier_stats = FeatureStats(inception_feats.shape[1]), FeatureStats(classifier_feats.shape[1])
    inception_stats.update(inception_feats)
    classifier_stats.update(classifier_feats)
    precision, recall = precision_recall(ref_inception["features"], inception_feats, e.pr_neighbors)
    metrics = {
        "fid": fid_from_stats(inception_stats.mu, inception_stats.sigma, ref_inception["mu"], ref_inception["sigma"]),
        "kid": kid(ref_inception["features"], inception_feats, e.kid_subsets, e.kid_subset_size, seed=e.seed),
        "fid_classifier": fid_from_stats(classifier_stats.mu, classifier_stats.sigma, ref_classifier["mu"], ref_classifier["sigma"]),
        "class_accuracy": sum(p["correct"] for p in parts) / e.num_samples,
        "precision": precision,
        "recall": recall,
        "num_samples": e.num_samples,
        "step": gen_meta["step"],
        "feature_sha256": feature_sha256,
        "family": family,
        **sampler_settings(gen_meta),
    }
    atomic_write_json(cfg.eval_file(family), metrics)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"eval_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=gen_meta["step"])
        mlflow.set_tag("fid_feature_sha256", feature_sha256)
    logger.info(
        "fid %.2f  kid %.4f  fid_classifier %.3f  class_accuracy %.3f  precision %.3f  recall %.3f  (%d samples)",
        metrics["fid"], metrics["kid"], metrics["fid_classifier"], metrics["class_accuracy"], precision, recall, e.num_samples,
    )  # fmt: skip
    return metrics


def _reference_stats(cfg: RunConfig, classifier_dir: str) -> tuple[dict, dict, str]:
    """-> (Inception reference stats, classifier reference stats, Inception sha256), checked against the
    feature networks in use now."""
    ref_inception, feature_sha256 = load_inception_reference(cfg.ref_stats.out_dir, cfg.ref_stats.inception)
    ref_classifier = load_ref_stats(f"{cfg.ref_stats.out_dir}/classifier.npz")
    if ref_classifier["feature_sha256"] != sha256_file(f"{classifier_dir}/classifier.safetensors"):
        raise StageError(f"{cfg.ref_stats.out_dir}/classifier.npz: made with a different classifier; rerun ref_stats")
    return ref_inception, ref_classifier, feature_sha256


def _sample_on_ray(cfg: RunConfig, generator_dir: str, classifier_dir: str, logger, family: str) -> list[dict]:
    """One Ray task per worker, each a strided share of the sample indices -> their features."""
    e = cfg.evaluate
    ray = init_ray(cfg)
    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0)(_eval_task)
    workers = min(cfg.ray.num_workers, e.num_samples)
    logger.info("generating %d %s samples on %d Ray workers", e.num_samples, family, workers)
    all_indices = np.arange(e.num_samples)
    futures = [
        task.remote(generator_dir, classifier_dir, cfg.ref_stats.inception.model_dump(), all_indices[w::workers], e.seed,
                    e.batch_size, e.precision, cfg.ray.cpus_per_worker, cfg.ray.use_gpu, w)
        for w in range(workers)
    ]  # fmt: skip
    try:
        return ray.get(futures)
    finally:
        ray.shutdown()


def sampler_settings(gen_meta: dict) -> dict:
    sampler = gen_meta.get("sampler")
    if not sampler:
        return {}
    return {"sampler": sampler["name"], "sampler_steps": sampler["num_steps"], "guidance_scale": sampler["guidance_scale"]}
