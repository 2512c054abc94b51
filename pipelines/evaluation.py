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

An image-to-image model (pix2pix) is measured on pairs: sample i is the translation of reference image i's input
(its edge map, or the input the user paired with it), for every reference image, so its FID, KID, precision and recall compare the translations with their own targets (a perfect
translator scores 0, below the protocol's real-vs-real floor, which measures other real images), its class accuracy
is the classifier's agreement with the target's label, and L1 and PSNR measure each translation against its target.
A text-to-image model (t2i) is measured the same way on the reference images' captions (the data's own, from a caption
sidecar, or else gen_core.captions', worded with the model's own attribute scale): sample i is generated from reference
image i's caption, its class accuracy is against that image's class, and for worded captions brightness and size
agreement say how often the image has the attribute its caption asked for (over the captions that name one; chance is
about 1/3).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gen_core.captions import captions_for
from gen_core.classifier import classifier_outputs, load_classifier
from gen_core.config import RunConfig
from gen_core.data import PreparedSplit, reference_split
from gen_core.generators import PAIRED_FAMILIES, PAIRED_KEYS, load_image_generator, read_generator_meta
from gen_core.io import atomic_write_bytes, atomic_write_json, sha256_file
from gen_core.metrics import (
    inception_features, load_inception, load_inception_reference, load_ref_stats, protocol_id, sample_metrics,
)  # fmt: skip
from gen_core.sampling import balanced_labels, to_uint8, to_unit
from gen_core.training import autocast_dtype
from pipelines.common import StageError, format_duration, log
from pipelines.ray_env import init_ray, ray_address
from pipelines.tracking import connect, training_run


def _features(make, classifier, inception, indices: np.ndarray, batch_size: int, report=None) -> dict:
    """`make(chunk)` -> (uint8 images, their labels, {name: a per-image measure}) for each batch of `indices` -> the images'
    Inception and classifier features, classifier probabilities, labels and measures, in the order of `indices`."""
    inception_feats, classifier_feats, probabilities, all_labels, measures = [], [], [], [], {}
    for start in range(0, len(indices), batch_size):
        images, labels, measured = make(indices[start : start + batch_size])
        inception_feats.append(inception_features(inception, images).astype(np.float32))
        probs, feats = classifier_outputs(classifier, images)
        classifier_feats.append(feats.astype(np.float32))
        probabilities.append(probs)
        all_labels.append(labels)
        for key, values in measured.items():
            measures.setdefault(key, []).append(values)
        if report:
            report(min(start + batch_size, len(indices)), len(indices))
    return {
        "inception": np.concatenate(inception_feats), "classifier": np.concatenate(classifier_feats),
        "probabilities": np.concatenate(probabilities), "labels": np.concatenate(all_labels), "indices": indices,
        "inception_precision": inception.precision, **{key: np.concatenate(values) for key, values in measures.items()},
    }  # fmt: skip


def features_for_indices(
    generator, classifier, inception, indices: np.ndarray, seed: int, batch_size: int, device, report=None, amp_dtype=None,
) -> dict:  # fmt: skip
    """Generate samples `indices` (sample i: class i mod K, seed `seed + i`) -> their Inception and classifier features,
    classifier probabilities and the classes they were generated for."""

    def make(chunk: np.ndarray):
        labels = balanced_labels(chunk, generator.num_classes)
        images = to_uint8(generator.sample(labels, [seed + int(i) for i in chunk], device, autocast_dtype=amp_dtype).cpu())
        return images, labels.numpy(), {}

    return _features(make, classifier, inception, indices, batch_size, report)


def paired_features_for_indices(
    model, family: str, reference: PreparedSplit, classifier, inception, indices: np.ndarray, seed: int, batch_size: int,
    device, report=None, amp_dtype=None,
) -> dict:  # fmt: skip
    """Sample i made from reference image i (reference.images[i], of class reference.labels[i]) -> the features, with the
    target's label and the family's own measures per sample. pix2pix: the translation of its input (its edge map, or the
    input the user paired with it), with L1 and PSNR to the target. t2i: the image generated from its caption (seed
    `seed + i`; the data's own caption where it has one, else the caption worded from its class and measured attributes),
    with, for worded captions, whether the generated image has the brightness and size the caption asked for (NaN where
    the caption names none: a middle level has no word)."""
    from gen_core.diffusion import psnr  # diffusers: imported only where a model needs it (gen_core.generators)
    from gen_core.pix2pix import pair_inputs

    targets, labels = reference.images, reference.labels
    if family == "t2i":
        worded = reference.captions is None
        captions = captions_for(targets, labels, model.class_names, model.scale) if worded else reference.captions
        asked = model.scale.levels(targets) if worded else None
    else:  # the model's inputs, made as its training pairs were (edge maps, or the user's own inputs)
        inputs = pair_inputs(reference, model.meta["condition"], model.meta["edge_threshold"])

    def make(chunk: np.ndarray):
        if family == "pix2pix":
            images = to_uint8(model.translate(inputs[chunk], device, amp_dtype))
            target, made = to_unit(torch.from_numpy(targets[chunk])), to_unit(images)  # as saved: what the metrics see
            return images, labels[chunk], {"l1": (made - target).abs().flatten(1).mean(1).numpy(), "psnr": psnr(target, made).numpy()}
        images = to_uint8(model.sample([captions[i] for i in chunk], [seed + int(i) for i in chunk], device, autocast_dtype=amp_dtype).cpu())
        if asked is None:
            return images, labels[chunk], {}
        made = model.scale.levels(images.numpy())
        measured = {f"{name}_agreement": np.where(asked[k][chunk] != 1, (made[k] == asked[k][chunk]).astype(float), np.nan)
                    for k, name in enumerate(("brightness", "size"))}  # fmt: skip
        return images, labels[chunk], measured

    return _features(make, classifier, inception, indices, batch_size, report)


def _eval_task(cfg: RunConfig, generator_dir: str, classifier_dir: str, indices: np.ndarray, threads: int, worker: int | None,
               guidance: float | None = None) -> dict:  # fmt: skip
    """Samples `indices` of the evaluation (in this process, or as a Ray task) -> their features. `guidance`:
    a diffusion model's classifier-free guidance scale instead of the one it was exported with."""
    e = cfg.evaluate
    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.ray.use_gpu else "cpu")
    generator, meta = load_image_generator(generator_dir)
    if guidance is not None:
        generator.sampler = generator.sampler.model_copy(update={"guidance_scale": guidance})
    classifier, _ = load_classifier(classifier_dir)
    inception = load_inception(cfg.ref_stats.inception, device, e.active.inception_precision)
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        rate = done / (time.monotonic() - started)
        who = "" if worker is None else f" worker {worker}:"
        sys.stdout.write(f"[evaluate]{who} {done}/{total} samples, {rate:.1f} img/s, eta {format_duration((total - done) / rate)}\n")
        sys.stdout.flush()

    amp_dtype = autocast_dtype(e.precision, device)
    family = meta.get("family", "gan")
    if family in PAIRED_FAMILIES:
        return paired_features_for_indices(generator.to(device), family, reference_split(cfg), classifier, inception, indices, e.seed,
                                           e.batch_size, device, report, amp_dtype)  # fmt: skip
    return features_for_indices(generator.to(device), classifier, inception, indices, e.seed, e.batch_size, device, report, amp_dtype)


def _merge(parts: list[dict]) -> dict:
    """The workers' strided shares back in sample order."""
    order = np.argsort(np.concatenate([p["indices"] for p in parts]))
    keys = ("inception", "classifier", "probabilities", "labels", *PAIRED_KEYS)
    return {key: np.concatenate([p[key] for p in parts])[order] for key in keys if key in parts[0]}




def evaluate(cfg: RunConfig, family: str, model_uri: str | None = None) -> dict:
    """Sample the family's exported generator (in this process or on Ray workers) and measure it under the configured protocol
    -> the metrics record with the protocol's floor, also written to <evaluate.out_dir>/<protocol>/<family>.json
    and logged to the model's training run."""
    logger = log("evaluate")
    e = cfg.evaluate
    model = _Model.open(cfg, family)
    mlflow = connect(cfg)  # before the sampling: the results go to the model's training run
    run_id = training_run(mlflow, model.meta.get("mlflow_run_id"), model.generator_dir)
    metrics = {**_measure(cfg, model, logger), **({"model_uri": model_uri} if model_uri else {})}
    atomic_write_json(cfg.eval_file(family), metrics)
    with mlflow.start_run(run_id=run_id):
        # one metric name per protocol (eval_quick/fid, eval_standard/fid): curves of different protocols never mix
        mlflow.log_metrics({f"eval_{e.protocol}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=model.meta["step"])
        mlflow.set_tags({"fid_feature_sha256": metrics["feature_sha256"], "eval_protocol_id": metrics["protocol_id"]})
    logger.info("%s (%s)", report_line(metrics), metrics["protocol_id"])
    return metrics


GUIDANCE_NAMES = {"cfg": "classifier-free guidance", "autoguidance": "autoguidance", "guide_null": "guidance against the guide's null class",
                  "guide_blend": "guidance against a blend of the guide's classes"}
GUIDANCE_KEYS = ("fid", "kid", "precision", "recall", "class_accuracy", "fid_classifier", "classes_covered", "diversity")
EXTRAPOLATED_KEYS = ("fid_extrapolated", "fid_extrapolated_to", "fid_infinity")  # protocols with fid_extrapolate_to


def guidance_sweep(cfg: RunConfig, family: str) -> dict:
    """A diffusion model's metrics at each of evaluate.guidance.scales (same weights, same seeds, same protocol),
    and the scale with the lowest FID among those whose class accuracy reaches evaluate.guidance.class_accuracy_floor
    -> the record written to <evaluate.out_dir>/<protocol>/<family>_guidance.json, with a plot beside it
    (<family>_guidance.png); both are logged to the model's training run under guidance/<protocol>/."""
    logger = log("evaluate")
    e, sweep = cfg.evaluate, cfg.evaluate.guidance
    generator_dir = Path(cfg.generator_dir(family)).resolve()
    held = read_generator_meta(generator_dir).get("family", "gan")
    if held not in ("ldm", "t2i"):
        raise StageError(f"{generator_dir}: a {held} model has no classifier-free guidance to sweep")
    model = _Model.open(cfg, family)
    mlflow = connect(cfg)
    run_id = training_run(mlflow, model.meta.get("mlflow_run_id"), model.generator_dir)
    curve = []
    for scale in sweep.scales:
        logger.info("guidance %g (%d of %d)", scale, len(curve) + 1, len(sweep.scales))
        metrics = _measure(cfg, model, logger, guidance=scale)
        curve.append({"guidance": scale, **{k: metrics[k] for k in GUIDANCE_KEYS}, **{k: metrics[k] for k in EXTRAPOLATED_KEYS if k in metrics}})
        logger.info("guidance %g: %s", scale, report_line(metrics))
    chosen = choose_guidance(curve, sweep.class_accuracy_floor)
    record = {
        "family": family, "protocol": e.protocol, "protocol_id": metrics["protocol_id"], "floor": metrics["floor"],
        "step": model.meta["step"], "sampler": metrics["sampler"], "sampler_steps": metrics["sampler_steps"],
        "exported_guidance": model.meta["sampler"]["guidance_scale"], "class_accuracy_floor": sweep.class_accuracy_floor,
        "chosen": chosen and chosen["guidance"], "curve": curve,
        **{key: metrics[key] for key in ("guidance_interval", "guidance", "guide_blend") if key in metrics},
    }  # fmt: skip
    out = Path(cfg.eval_file(family)).with_name(f"{family}_guidance.json")
    atomic_write_json(out, record)
    plot_guidance(record, out.with_suffix(".png"))
    with mlflow.start_run(run_id=run_id):
        for path in (out, out.with_suffix(".png")):
            mlflow.log_artifact(str(path), artifact_path=f"guidance/{e.protocol}")
    logger.info("guidance sweep (%s):\n%s", metrics["protocol_id"], guidance_table(record))
    if chosen is None:
        logger.info("no scale reaches class accuracy %.2f (evaluate.guidance.class_accuracy_floor)", sweep.class_accuracy_floor)
    else:
        logger.info("lowest FID with class accuracy >= %.2f: guidance %g (FID %.2f, recall %.3f, class accuracy %.3f); the model was exported "
                    "with %g (ldm.sampler.guidance_scale)", sweep.class_accuracy_floor, chosen["guidance"], chosen["fid"], chosen["recall"],
                    chosen["class_accuracy"], record["exported_guidance"])  # fmt: skip
    return record


def choose_guidance(curve: list[dict], class_accuracy_floor: float) -> dict | None:
    """The point of the curve with the lowest FID among those whose class accuracy reaches the floor; None if none does."""
    eligible = [point for point in curve if point["class_accuracy"] >= class_accuracy_floor]
    return min(eligible, key=lambda point: point["fid"]) if eligible else None


def guidance_table(record: dict) -> str:
    rows = ["| guidance | FID | KID | precision | recall | class accuracy | classes covered |", "|---|---|---|---|---|---|---|"]
    rows.append(f"| real-vs-real floor | {record['floor']['fid']:.2f} | {record['floor']['kid']:.4f} | {record['floor']['precision']:.3f} | "
                f"{record['floor']['recall']:.3f} | {record['floor']['class_accuracy']:.3f} | {record['floor']['classes_covered']} |")  # fmt: skip
    for p in record["curve"]:
        mark = "**" if p["guidance"] == record["chosen"] else ""
        rows.append(f"| {mark}{p['guidance']:g}{mark} | {p['fid']:.2f} | {p['kid']:.4f} | {p['precision']:.3f} | {p['recall']:.3f} | "
                    f"{p['class_accuracy']:.3f} | {p['classes_covered']} |")  # fmt: skip
    return "\n".join(rows)


def plot_guidance(record: dict, path: Path) -> None:
    """FID (left axis) and recall and class accuracy (right axis) against the guidance scale, floors dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [p["guidance"] for p in record["curve"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(scales, [p["fid"] for p in record["curve"]], marker="o", color="C0", label="FID")
    ax.axhline(record["floor"]["fid"], color="C0", linestyle="--", linewidth=0.8, label="FID floor (real vs real)")
    interval = f", guided at sigma in ({record['guidance_interval'][0]:g}, {record['guidance_interval'][1]:g}]" if record.get("guidance_interval") else ""
    blend = f" (conditional share {record['guide_blend']:g})" if record.get("guide_blend") is not None else ""
    ax.set(xlabel=f"{GUIDANCE_NAMES[record.get('guidance', 'cfg')]}{blend} scale", ylabel="FID", title=f"{record['sampler']} {record['sampler_steps']} steps{interval}, step {record['step']}: "
           f"{record['protocol_id']}")  # fmt: skip
    ax.title.set_fontsize(8)
    right = ax.twinx()
    right.plot(scales, [p["recall"] for p in record["curve"]], marker="s", color="C1", label="recall")
    right.plot(scales, [p["class_accuracy"] for p in record["curve"]], marker="^", color="C2", label="class accuracy")
    right.axhline(record["class_accuracy_floor"], color="C2", linestyle=":", linewidth=0.8, label="class accuracy floor")
    right.set(ylabel="recall, class accuracy", ylim=(0, 1))
    if record["chosen"] is not None:
        ax.axvline(record["chosen"], color="grey", linewidth=0.8)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=3, frameon=False)
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


class _Model:
    """The family's exported generator as the evaluation sees it: its directory, its generator.json, the
    classifier's directory, and the protocol's reference statistics and floor."""

    def __init__(self, generator_dir: str, meta: dict, classifier_dir: str, reference: dict, floor: dict):
        self.generator_dir, self.meta, self.classifier_dir, self.reference, self.floor = generator_dir, meta, classifier_dir, reference, floor

    @classmethod
    def open(cls, cfg: RunConfig, family: str) -> "_Model":
        generator_dir = str(Path(cfg.generator_dir(family)).resolve())
        classifier_dir = str(Path(cfg.classifier.out_dir).resolve())
        meta = read_generator_meta(generator_dir)
        if meta.get("family", "gan") != family:
            raise StageError(f"{generator_dir}: holds a {meta.get('family')} model, not {family}")
        return cls(generator_dir, meta, classifier_dir, *reference_stats(cfg, classifier_dir))


def _measure(cfg: RunConfig, model: _Model, logger, guidance: float | None = None) -> dict:
    """Sample the model and measure the samples under the configured protocol -> the metrics record, with the floor."""
    e = cfg.evaluate
    family = model.meta.get("family", "gan")
    parts = _sample(cfg, model.generator_dir, model.classifier_dir, logger, family, guidance)
    used = protocol_id(e.protocol, e.active, parts[0]["inception_precision"], model.reference["inception"]["count"])
    if used != model.floor["protocol_id"]:
        raise StageError(f"{cfg.reference_dir}: reference statistics are for {model.floor['protocol_id']}, the samples were measured as {used}; rerun ref_stats")
    settings = sampler_settings(model.meta)
    if guidance is not None:
        settings["guidance_scale"] = guidance
    merged = _merge(parts)
    paired = {key: float(np.nanmean(merged[key])) for key in PAIRED_KEYS if key in merged}  # means over the samples that have one
    return {
        **sample_metrics(model.reference, merged, e), **paired, "protocol": e.protocol, "protocol_id": used,
        "floor": {k: model.floor[k] for k in FLOOR_KEYS if k in model.floor}, "step": model.meta["step"],
        "feature_sha256": model.reference["inception"]["feature_sha256"], "family": family, **settings,
    }  # fmt: skip


FLOOR_KEYS = ("fid", "kid", "precision", "recall", "fid_classifier", "class_accuracy", "classifier_score", "classes_covered", "diversity",
              "fid_extrapolated")  # the last: protocols with fid_extrapolate_to, and floors measured since it exists


def report_line(metrics: dict) -> str:
    """The headline metrics, each with the protocol's real-vs-real floor in brackets."""
    floor = metrics.get("floor", {})
    fmt = {"fid": ".2f", "kid": ".4f", "fid_classifier": ".3f", "class_accuracy": ".3f", "classifier_score": ".2f",
           "precision": ".3f", "recall": ".3f", "classes_covered": "d", "diversity": ".3f", "l1": ".4f", "psnr": ".2f",
           "brightness_agreement": ".3f", "size_agreement": ".3f"}  # fmt: skip
    line = "  ".join(
        f"{key} {metrics[key]:{f}}" + (f" [floor {floor[key]:{f}}]" if key in floor else "") for key, f in fmt.items() if key in metrics
    ) + f"  ({metrics['num_samples']} samples)"
    if "fid_extrapolated" in metrics:  # Chong & Forsyth's fit in 1/N, to compare with figures measured at that many samples
        at = metrics["fid_extrapolated_to"]
        line += f"; fid at {at} samples (extrapolated) {metrics['fid_extrapolated']:.2f}" + (
            f" [floor {floor['fid_extrapolated']:.2f}]" if "fid_extrapolated" in floor else "")  # fmt: skip
    return line


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


def _sample(cfg: RunConfig, generator_dir: str, classifier_dir: str, logger, family: str, guidance: float | None = None) -> list[dict]:
    """The samples' features, as one part per worker: in this process (one part) unless the work belongs on Ray."""
    e = cfg.evaluate
    num_samples = sample_count(cfg, family)
    if ray_address(cfg) or (cfg.ray.use_gpu and cfg.ray.num_workers > 1):
        return _sample_on_ray(cfg, generator_dir, classifier_dir, logger, family, guidance)
    threads = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    logger.info("%s %d %s samples in this process, %d threads (protocol %s)", verb(family), num_samples, family, threads, e.protocol)
    return [_eval_task(cfg, generator_dir, classifier_dir, np.arange(num_samples), threads, None, guidance)]


def _sample_on_ray(cfg: RunConfig, generator_dir: str, classifier_dir: str, logger, family: str, guidance: float | None = None) -> list[dict]:
    """One Ray task per worker, each a strided share of the sample indices -> their features."""
    e = cfg.evaluate
    ray = init_ray(cfg)
    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0)(_eval_task)
    num_samples = sample_count(cfg, family)
    workers = min(cfg.ray.num_workers, num_samples)
    logger.info("%s %d %s samples on %d Ray workers (protocol %s)", verb(family), num_samples, family, workers, e.protocol)
    all_indices = np.arange(num_samples)
    futures = [task.remote(cfg, generator_dir, classifier_dir, all_indices[w::workers], cfg.ray.cpus_per_worker, w, guidance)
               for w in range(workers)]  # fmt: skip
    try:
        return ray.get(futures)
    finally:
        ray.shutdown()


def sample_count(cfg: RunConfig, family: str) -> int:
    """The protocol's samples; for a paired family one per reference image (the protocols' sample counts equal their
    reference counts; where they differ, as in the tiny profile, every reference image is used once)."""
    return len(reference_split(cfg).labels) if family in PAIRED_FAMILIES else cfg.evaluate.active.num_samples


def verb(family: str) -> str:
    return "translating" if family == "pix2pix" else "generating"


def sampler_settings(gen_meta: dict) -> dict:
    sampler = gen_meta.get("sampler")
    if not sampler:
        return {}
    interval = sampler.get("guidance_interval")  # these three only where set: a run without them records what it did before
    guidance = sampler.get("guidance", "cfg")
    return {"sampler": sampler["name"], "sampler_steps": sampler["num_steps"], "guidance_scale": sampler["guidance_scale"],
            **({"guidance_interval": list(interval)} if interval else {}), **({"guidance": guidance} if guidance != "cfg" else {}),
            **({"guide_blend": sampler["guide_blend"]} if sampler.get("guide_blend") is not None else {})}  # fmt: skip
