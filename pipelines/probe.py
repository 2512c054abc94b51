"""In-training evaluation: metrics a run computes at each of its checkpoints (rank 0), today for
sweep trials, which register it through RunContext.evaluation so that Tune's schedulers can rank them.

- every checkpoint: `fid_classifier` and `class_accuracy` of `num_samples` samples at fixed seeds
  (classifier features against ref_stats/classifier.npz): cheap enough to judge trials early;
- the last step: also Inception `fid` on `final_samples` samples against ref_stats/inception.npz.

Sample i has class i mod K and seed `seed + i` (as in the evaluate stage), so every trial and every
report is judged on the same noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from gen_core.classifier import classify, load_classifier
from gen_core.config import InceptionConfig
from gen_core.metrics import FeatureStats, fid_from_stats, inception_features, load_inception, load_ref_stats
from gen_core.sampling import balanced_labels, to_uint8


@dataclass(frozen=True)
class ProbeSpec:
    """What a trial's workers need to compute the probe; plain data, so it travels in RunContext.evaluation."""

    classifier_dir: str
    ref_stats_dir: str
    inception: dict
    num_samples: int
    final_samples: int
    seed: int
    final_step: int  # the trial's last step (a PBT interval's run ends earlier): Inception FID there
    batch_size: int = 100


def checkpoint_evaluator(worker, report) -> Callable[[int, object, object], dict[str, float]] | None:
    """The run's in-training evaluation, or None when it asked for none (and on ranks other than 0).
    evaluate(step, generator, amp_dtype) -> metrics, also logged to MLflow at `step`."""
    spec = worker.ctx.evaluation
    if not spec or not worker.is_chief:
        return None
    probe = Probe(spec, worker.device)

    def evaluate(step: int, generator, amp_dtype) -> dict[str, float]:
        started = time.monotonic()
        values = probe(generator, final=step == probe.spec.final_step, amp_dtype=amp_dtype)
        report.say(f"probe at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in values.items()) + f" ({time.monotonic() - started:.1f}s)")
        report.log_metrics(values, step)
        return values

    return evaluate


class Probe:
    def __init__(self, spec: dict, device: torch.device):
        self.spec = ProbeSpec(**spec)
        self.device = device
        self.classifier = load_classifier(self.spec.classifier_dir)[0]  # small CNN: runs on CPU (gen_core.classifier.classify)
        self.ref_classifier = load_ref_stats(f"{self.spec.ref_stats_dir}/classifier.npz")
        self._inception = None

    def _samples(self, generator, count: int, amp_dtype) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for start in range(0, count, self.spec.batch_size):
            index = np.arange(start, min(start + self.spec.batch_size, count))
            y = balanced_labels(index, generator.num_classes)
            seeds = [self.spec.seed + int(i) for i in index]
            images.append(to_uint8(generator.sample(y, seeds, self.device, autocast_dtype=amp_dtype).cpu()))
            labels.append(y)
        return torch.cat(images), torch.cat(labels)

    @torch.no_grad()
    def __call__(self, generator, final: bool, amp_dtype=None) -> dict[str, float]:
        images, labels = self._samples(generator, self.spec.num_samples, amp_dtype)
        predictions, features = classify(self.classifier, images)
        stats = FeatureStats(features.shape[1])
        stats.update(features)
        out = {
            "fid_classifier": fid_from_stats(stats.mu, stats.sigma, self.ref_classifier["mu"], self.ref_classifier["sigma"]),
            "class_accuracy": float((predictions == labels.numpy()).mean()),
        }
        if final:
            out["fid"] = self.inception_fid(generator, amp_dtype)
        return out

    def inception_fid(self, generator, amp_dtype=None) -> float:
        if self._inception is None:
            self._inception = (load_inception(InceptionConfig(**self.spec.inception), self.device),
                               load_ref_stats(f"{self.spec.ref_stats_dir}/inception.npz"))  # fmt: skip
        net, ref = self._inception
        images, _ = self._samples(generator, self.spec.final_samples, amp_dtype)
        feats = np.concatenate([inception_features(net, images[i : i + 50]) for i in range(0, len(images), 50)])
        stats = FeatureStats(feats.shape[1])
        stats.update(feats)
        return fid_from_stats(stats.mu, stats.sigma, ref["mu"], ref["sigma"])
