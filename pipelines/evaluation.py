"""Evaluating an exported generator under an evaluation protocol (evaluate.protocols): FID, KID,
precision/recall, classifier-feature FID, class accuracy, classifier score and the per-class metrics
(gen_core.metrics.sample_metrics), each reported with the protocol's real-vs-real floor. Used by the
evaluate stage and by the sweep for its best trial.

The exported generator (gen_core.generators) says how it samples. On a Ray cluster (ray.address or
RAY_ADDRESS), or locally across several GPUs, samples are generated on Ray workers (one task per worker,
each a strided share of sample indices, streamed in batches). Otherwise this process samples them itself,
with all ray.num_workers x ray.cpus_per_worker threads: a local Ray would only add its start-up (seconds
of CPU on a laptop) to the same work. Sample i uses seed `evaluate.seed + i` and class i mod K, so the
metrics do not depend on where or on how many workers the samples were made.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gen_core.classifier import classifier_outputs, load_classifier
from gen_core.config import RunConfig
from gen_core.generators import load_image_generator, read_generator_meta
from gen_core.io import atomic_write_json, sha256_file
from gen_core.metrics import (
    inception_features, load_inception, load_inception_reference, load_ref_stats, protocol_id, sample_metrics,
)  # fmt: skip
from gen_core.sampling import balanced_labels, to_uint8
from gen_core.training import autocast_dtype
from pipelines.common import StageError, format_duration, log
from pipelines.ray_env import init_ray, ray_address
from pipelines.tracking import connect, training_run


def features_for_indices(
    generator, classifier, inception, indices: np.ndarray, seed: int, batch_size: int, device, report=None, amp_dtype=None,
) -> dict:  # fmt: skip
    """Generate samples `indices` -> their Inception and classifier features, classifier probabilities
    and the classes they were generated for."""
    inception_feats, classifier_feats, probabilities, all_labels = [], [], [], []
    num_classes = generator.num_classes
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        labels = balanced_labels(chunk, num_classes)
        images = to_uint8(generator.sample(labels, [seed + int(i) for i in chunk], device, autocast_dtype=amp_dtype).cpu())
        inception_feats.append(inception_features(inception, images).astype(np.float32))
        probs, feats = classifier_outputs(classifier, images)
        classifier_feats.append(feats.astype(np.float32))
        probabilities.append(probs)
        all_labels.append(labels.numpy())
        if report:
            report(min(start + batch_size, len(indices)), len(indices))
    return {
        "inception": np.concatenate(inception_feats), "classifier": np.concatenate(classifier_feats),
        "probabilities": np.concatenate(probabilities), "labels": np.concatenate(all_labels), "indices": indices,
        "inception_precision": inception.precision,
    }  # fmt: skip


def _eval_task(cfg: RunConfig, generator_dir: str, classifier_dir: str, indices: np.ndarray, threads: int, worker: int | None) -> dict:
    """Samples `indices` of the evaluation (in this process, or as a Ray task) -> their features."""
    e = cfg.evaluate
    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.ray.use_gpu else "cpu")
    generator, _ = load_image_generator(generator_dir)
    classifier, _ = load_classifier(classifier_dir)
    inception = load_inception(cfg.ref_stats.inception, device, e.active.inception_precision)
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        rate = done / (time.monotonic() - started)
        who = "" if worker is None else f" worker {worker}:"
        sys.stdout.write(f"[evaluate]{who} {done}/{total} samples, {rate:.1f} img/s, eta {format_duration((total - done) / rate)}\n")
        sys.stdout.flush()

    amp_dtype = autocast_dtype(e.precision, device)
    return features_for_indices(generator.to(device), classifier, inception, indices, e.seed, e.batch_size, device, report, amp_dtype)


def _merge(parts: list[dict]) -> dict:
    """The workers' strided shares back in sample order."""
    order = np.argsort(np.concatenate([p["indices"] for p in parts]))
    return {key: np.concatenate([p[key] for p in parts])[order] for key in ("inception", "classifier", "probabilities", "labels")}


def evaluate(cfg: RunConfig, family: str, model_uri: str | None = None) -> dict:
    """Sample the family's exported generator (in this process or on Ray workers) and measure it under the configured protocol
    -> the metrics record with the protocol's floor, also written to <evaluate.out_dir>/<protocol>/<family>.json
    and logged to the model's training run."""
    logger = log("evaluate")
    e = cfg.evaluate
    generator_dir = str(Path(cfg.generator_dir(family)).resolve())
    classifier_dir = str(Path(cfg.classifier.out_dir).resolve())
    gen_meta = read_generator_meta(generator_dir)
    if gen_meta.get("family", "gan") != family:
        raise StageError(f"{generator_dir}: holds a {gen_meta.get('family')} model, not {family}")
    reference, floor = reference_stats(cfg, classifier_dir)
    mlflow = connect(cfg)  # before the sampling: the results go to the model's training run
    run_id = training_run(mlflow, gen_meta.get("mlflow_run_id"), generator_dir)

    parts = _sample(cfg, generator_dir, classifier_dir, logger, family)
    used = protocol_id(e.protocol, e.active, parts[0]["inception_precision"], reference["inception"]["count"])
    if used != floor["protocol_id"]:
        raise StageError(f"{cfg.reference_dir}: reference statistics are for {floor['protocol_id']}, the samples were measured as {used}; rerun ref_stats")
    metrics = {
        **sample_metrics(reference, _merge(parts), e), "protocol": e.protocol, "protocol_id": used,
        "floor": {k: floor[k] for k in FLOOR_KEYS}, "step": gen_meta["step"],
        "feature_sha256": reference["inception"]["feature_sha256"], "family": family, **sampler_settings(gen_meta),
        **({"model_uri": model_uri} if model_uri else {}),
    }  # fmt: skip
    atomic_write_json(cfg.eval_file(family), metrics)
    with mlflow.start_run(run_id=run_id):
        # one metric name per protocol (eval_quick/fid, eval_standard/fid): curves of different protocols never mix
        mlflow.log_metrics({f"eval_{e.protocol}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=gen_meta["step"])
        mlflow.set_tags({"fid_feature_sha256": metrics["feature_sha256"], "eval_protocol_id": used})
    logger.info("%s (%s)", report_line(metrics), used)
    return metrics


FLOOR_KEYS = ("fid", "kid", "precision", "recall", "fid_classifier", "class_accuracy", "classifier_score", "classes_covered", "diversity")


def report_line(metrics: dict) -> str:
    """The headline metrics, each with the protocol's real-vs-real floor in brackets."""
    floor = metrics.get("floor", {})
    fmt = {"fid": ".2f", "kid": ".4f", "fid_classifier": ".3f", "class_accuracy": ".3f", "classifier_score": ".2f",
           "precision": ".3f", "recall": ".3f", "classes_covered": "d", "diversity": ".3f"}  # fmt: skip
    return "  ".join(
        f"{key} {metrics[key]:{f}}" + (f" [floor {floor[key]:{f}}]" if key in floor else "") for key, f in fmt.items() if key in metrics
    ) + f"  ({metrics['num_samples']} samples)"


def reference_stats(cfg: RunConfig, classifier_dir: str) -> tuple[dict, dict]:
    """-> ({"inception": ..., "classifier": ...} reference statistics, the floor record), checked against
    the feature networks in use now."""
    ref_inception, _ = load_inception_reference(cfg.reference_dir, cfg.ref_stats.inception)
    ref_classifier = load_ref_stats(f"{cfg.reference_dir}/classifier.npz")
    if ref_classifier["feature_sha256"] != sha256_file(f"{classifier_dir}/classifier.safetensors"):
        raise StageError(f"{cfg.reference_dir}/classifier.npz: made with a different classifier; rerun ref_stats")
    try:
        floor = json.loads(Path(f"{cfg.reference_dir}/floor.json").read_text())
    except FileNotFoundError:
        raise StageError(f"{cfg.reference_dir}/floor.json: not found (run the ref_stats stage first)") from None
    return {"inception": ref_inception, "classifier": ref_classifier}, floor


def _sample(cfg: RunConfig, generator_dir: str, classifier_dir: str, logger, family: str) -> list[dict]:
    """The samples' features, as one part per worker: in this process (one part) unless the work belongs on Ray."""
    e = cfg.evaluate
    num_samples = e.active.num_samples
    if ray_address(cfg) or (cfg.ray.use_gpu and cfg.ray.num_workers > 1):
        return _sample_on_ray(cfg, generator_dir, classifier_dir, logger, family)
    threads = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    logger.info("generating %d %s samples in this process, %d threads (protocol %s)", num_samples, family, threads, e.protocol)
    return [_eval_task(cfg, generator_dir, classifier_dir, np.arange(num_samples), threads, None)]


def _sample_on_ray(cfg: RunConfig, generator_dir: str, classifier_dir: str, logger, family: str) -> list[dict]:
    """One Ray task per worker, each a strided share of the sample indices -> their features."""
    e = cfg.evaluate
    ray = init_ray(cfg)
    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0)(_eval_task)
    num_samples = e.active.num_samples
    workers = min(cfg.ray.num_workers, num_samples)
    logger.info("generating %d %s samples on %d Ray workers (protocol %s)", num_samples, family, workers, e.protocol)
    all_indices = np.arange(num_samples)
    futures = [task.remote(cfg, generator_dir, classifier_dir, all_indices[w::workers], cfg.ray.cpus_per_worker, w) for w in range(workers)]
    try:
        return ray.get(futures)
    finally:
        ray.shutdown()


def sampler_settings(gen_meta: dict) -> dict:
    sampler = gen_meta.get("sampler")
    if not sampler:
        return {}
    return {"sampler": sampler["name"], "sampler_steps": sampler["num_steps"], "guidance_scale": sampler["guidance_scale"]}
