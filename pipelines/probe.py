"""Evaluation during training: one code path for every training stage (`<section>.evaluation`) and for
sweep trials (which rank trials by it).

At each evaluation step the EMA model's samples on fixed seeds (sample i: class i mod K, seed
`seed + i`, as in the evaluate stage) are spread over every rank; the features come back to rank 0,
which measures them against the protocol's reference set with gen_core.metrics.sample_metrics
(classifier-feature FID, class accuracy, classifier-space recall, per-class diversity; Inception FID and
recall when asked), logs the curve to MLflow, and keeps the best value by the configured metric. The
loop records the result in its checkpoint; the best checkpoint is copied to <run>/best/ for the export;
`patience` evaluations without improvement stop the run.

    evaluate = checkpoint_evaluator(worker, report, store)   # None when the run asked for none
    if evaluate and evaluate.due(step):
        checkpoint.add_evaluation(evaluate(step, generator_on_rank_0, amp_dtype))   # collective
    if evaluate and evaluate.stop: break
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from gen_core.classifier import classifier_outputs, load_classifier
from gen_core.config import EVAL_METRIC_MODES, EvaluateConfig, InceptionConfig, RunConfig
from gen_core.data import read_manifest
from gen_core.io import filesystem
from gen_core.metrics import fid_from_features, inception_features, load_inception, load_ref_stats, sample_metrics
from gen_core.sampling import balanced_labels, to_uint8
from pipelines.common import StageError, absolute

SCALARS = ("fid_classifier", "class_accuracy", "classifier_score", "precision_classifier", "recall_classifier", "diversity",
           "classes_covered", "fid_classifier_worst_class", "fid", "kid", "precision", "recall")  # fmt: skip


@dataclass(frozen=True)
class EvaluationSpec:
    """What the workers need to evaluate; plain data, so it travels in RunContext.evaluation."""

    classifier_dir: str
    ref_stats_dir: str
    inception: dict
    inception_precision: str
    settings: dict  # EvaluateConfig fields (KID/precision-recall/classifier-score settings)
    num_samples: int
    seed: int
    every_steps: int
    final_step: int
    use_inception: bool = False  # Inception metrics at every evaluation
    final_inception_samples: int = 0  # sweeps: Inception FID on this many samples at final_step only
    metric: str = "fid_classifier"
    patience: int | None = None
    collapse_warning: float | None = None
    batch_size: int = 100
    guidance_scale: float | None = None  # a diffusion model's classifier-free guidance; None: the one it samples with

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0 or step == self.final_step


def evaluation_spec(cfg: RunConfig, section: str) -> dict | None:
    """The spec of `<section>.evaluation`, or None when it is off."""
    t = getattr(cfg, section)
    e = getattr(t, "evaluation", None)
    if e is None or e.every_steps is None:
        return None
    classifier_dir, reference_dir = absolute(cfg.classifier.out_dir), absolute(cfg.reference_dir)  # workers run elsewhere
    needed = [f"{classifier_dir}/classifier.safetensors", f"{reference_dir}/classifier.npz"] + ([f"{reference_dir}/inception.npz"] if e.inception else [])
    missing = [path for path in needed if not filesystem(path)[0].exists(path)]
    if missing:
        raise StageError(
            f"{section}.evaluation: {missing[0]} not found (run the classifier and ref_stats stages first, "
            f"or set {section}.evaluation.every_steps: null to train without evaluating)"
        )
    return asdict(protocol_spec(
        cfg, classifier_dir, reference_dir, num_samples=e.num_samples, every_steps=e.every_steps, final_step=t.total_steps,
        use_inception=e.inception, metric=e.metric, patience=e.patience, collapse_warning=e.collapse_warning,
        guidance_scale=getattr(e, "guidance_scale", None),
    ))  # fmt: skip


def protocol_spec(cfg: RunConfig, classifier_dir: str, reference_dir: str, **fields) -> EvaluationSpec:
    """An EvaluationSpec judged as the evaluation protocol judges (its feature networks' files, Inception precision,
    settings and seed), with the schedule and the rest in `fields`: a training run's (evaluation_spec) or a sweep's probe."""
    return EvaluationSpec(
        classifier_dir=classifier_dir, ref_stats_dir=reference_dir, inception=cfg.ref_stats.inception.model_dump(),
        inception_precision=cfg.evaluate.active.inception_precision, settings=cfg.evaluate.model_dump(mode="json"),
        seed=cfg.evaluate.seed, **fields,
    )  # fmt: skip


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's outcome, the same on every rank."""

    values: dict[str, float]
    best: dict  # {"step", "value", "since"}: the best evaluation so far and how many came after it
    is_best: bool
    stop: bool


def checkpoint_evaluator(worker, report, store) -> "Evaluator | None":
    spec = worker.ctx.evaluation
    return Evaluator(EvaluationSpec(**spec), worker, report, store.restored_meta) if spec else None


def collapse_warnings(diversity_per_class: list[float], class_names: list[str], ratio: float | None, step: int) -> list[str]:
    """One line per class whose samples' diversity is under `ratio` of the real images' (1 = as varied as real)."""
    if ratio is None:
        return []
    return [f"WARNING mode collapse suspected: class {c} ({class_names[c] if c < len(class_names) else c}) diversity {d:.2f} of real at step {step}"
            for c, d in enumerate(diversity_per_class) if d < ratio]  # fmt: skip


class Evaluator:
    def __init__(self, spec: EvaluationSpec, worker, report, restored_meta: dict | None):
        self.spec, self.worker, self.report = spec, worker, report
        self.settings = EvaluateConfig.model_validate(spec.settings)
        self.classifier = load_classifier(spec.classifier_dir)[0]  # small CNN: runs on CPU (gen_core.classifier)
        self.reference = {"classifier": load_ref_stats(f"{spec.ref_stats_dir}/classifier.npz")}
        self._inception = None
        self.class_names = read_manifest(worker.ctx.data_uri)["class_names"]
        self.best = (restored_meta or {}).get("evaluation_best")
        self.stop = False

    def due(self, step: int) -> bool:
        return self.spec.due(step)

    @property
    def inception(self):
        if self._inception is None:
            self._inception = load_inception(InceptionConfig(**self.spec.inception), self.worker.device, self.spec.inception_precision)
            self.reference["inception"] = load_ref_stats(f"{self.spec.ref_stats_dir}/inception.npz")
        return self._inception

    @torch.no_grad()
    def __call__(self, step: int, generator, amp_dtype) -> Evaluation:
        """Collective: every rank calls it; `generator` is needed on rank 0 only (the EMA model is gathered there)."""
        started, worker, spec = time.monotonic(), self.worker, self.spec
        generator = worker.broadcast(generator)  # the EMA model from rank 0 (ranks of one run trust each other)
        final_inception = spec.final_inception_samples if step == spec.final_step else 0
        count = max(spec.num_samples, final_inception)
        mine = self._features(generator, np.arange(count)[worker.rank :: worker.world_size], amp_dtype, spec.use_inception or final_inception > 0)
        parts = worker.all_gather(mine)  # collective
        outcome = self._measure(step, parts, count, final_inception) if worker.is_chief else None
        outcome = worker.broadcast(outcome)  # collective: every rank learns whether to stop
        self.best, self.stop = outcome.best, outcome.stop
        shown = " ".join(f"{k} {v:.4f}" for k, v in outcome.values.items()
                         if k in ("fid", "fid_classifier", "class_accuracy", "recall_classifier", "diversity", "min_class_diversity", "classes_covered"))  # fmt: skip
        note = " (best)" if outcome.is_best else f" (best {outcome.best['value']:.4f} at step {outcome.best['step']})"
        at = "" if spec.guidance_scale is None else f" at guidance {spec.guidance_scale:g}"
        self.report.say(f"evaluation at step {step}{at}: {shown}{note} ({time.monotonic() - started:.1f}s)")
        return outcome

    def _features(self, generator, indices: np.ndarray, amp_dtype, with_inception: bool) -> dict:
        out = {"indices": indices, "classifier": [], "probabilities": [], "labels": [], "inception": []}
        for start in range(0, len(indices), self.spec.batch_size):
            chunk = indices[start : start + self.spec.batch_size]
            labels = balanced_labels(chunk, generator.num_classes)
            guidance = {} if self.spec.guidance_scale is None else {"guidance_scale": self.spec.guidance_scale}
            images = to_uint8(generator.sample(labels, [self.spec.seed + int(i) for i in chunk], self.worker.device, autocast_dtype=amp_dtype,
                                               **guidance).cpu())  # fmt: skip
            probabilities, feats = classifier_outputs(self.classifier, images)
            out["classifier"].append(feats), out["probabilities"].append(probabilities), out["labels"].append(labels.numpy())
            if with_inception:
                out["inception"].append(inception_features(self.inception, images))
        return {k: (np.concatenate(v) if isinstance(v, list) and v else v) for k, v in out.items()}

    def _measure(self, step: int, parts: list[dict], count: int, final_inception: int) -> Evaluation:
        order = np.argsort(np.concatenate([p["indices"] for p in parts]))
        keys = ("classifier", "probabilities", "labels") + (("inception",) if self.spec.use_inception or final_inception else ())
        merged = {k: np.concatenate([p[k] for p in parts])[order] for k in keys}
        cheap = {k: v[: self.spec.num_samples] for k, v in merged.items() if k != "inception" or self.spec.use_inception}
        metrics = sample_metrics(self.reference, cheap, self.settings)
        if final_inception:  # the sweep's final Inception FID on its own sample count: the FID alone
            inception, reference = merged["inception"][:final_inception], self.reference["inception"]
            metrics["fid"] = fid_from_features(inception, reference["mu"], reference["sigma"])
        values = {k: float(metrics[k]) for k in SCALARS if k in metrics}
        per_class = metrics.get("diversity_per_class") or []
        if per_class:
            values["min_class_diversity"] = float(min(per_class))
        self.report.log_metrics({f"during_training/{k}": v for k, v in values.items()}, step)
        self.report.log_metrics({f"during_training/diversity_class_{c}": float(v) for c, v in enumerate(per_class)}, step)
        for line in collapse_warnings(per_class, self.class_names, self.spec.collapse_warning, step):
            self.report.say(line)
        value = values[self.spec.metric]
        better = self.best is None or (value < self.best["value"] if EVAL_METRIC_MODES[self.spec.metric] == "min" else value > self.best["value"])
        best = {"step": step, "value": value, "since": 0} if better else {**self.best, "since": self.best["since"] + 1}
        stop = self.spec.patience is not None and best["since"] >= self.spec.patience and step < self.spec.final_step
        return Evaluation(values, best, better, stop)
