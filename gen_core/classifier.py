"""Training, saving and using the small domain classifier (plain torch, single process).

On disk: <dir>/classifier.safetensors + classifier.json (channels, classes, sizes, eval accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file

from gen_core.checkpoint import CheckpointError
from gen_core.config import ClassifierConfig
from gen_core.io import atomic_directory
from gen_core.models import Classifier
from gen_core.sampling import to_unit


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ClassifierConfig,
    progress: Callable[[int, float], None] | None = None,
) -> Classifier:  # fmt: skip
    """images (N, C, H, W) uint8, labels (N,) -> trained Classifier (eval mode). Seeded: same result per seed."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = Classifier(images.shape[1], num_classes, cfg.width, cfg.feature_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps)
    model.train()
    for step in range(cfg.steps):
        index = torch.randint(len(labels), (cfg.batch_size,), generator=generator)
        batch = to_unit(images[index])
        # random +-2 px shifts: cheap augmentation that makes features less brittle to GAN artefacts
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
        batch = torch.roll(batch, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, loss.item())
    return model.eval()


@torch.no_grad()
def classifier_outputs(model: Classifier, images_uint8: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """-> (class probabilities (N, K) float64, features (N, feature_dim) float64)."""
    probabilities, features = [], []
    for start in range(0, len(images_uint8), batch_size):
        feats = model.features(to_unit(images_uint8[start : start + batch_size]))
        features.append(feats.double().numpy())
        probabilities.append(torch.softmax(model.head(feats).double(), 1).numpy())
    return np.concatenate(probabilities), np.concatenate(features)


def classify(model: Classifier, images_uint8: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """-> (predicted labels (N,), features (N, feature_dim) float64)."""
    probabilities, features = classifier_outputs(model, images_uint8, batch_size)
    return probabilities.argmax(1), features


class FeatureDistance(nn.Module):
    """A perceptual distance in a trained Classifier's features, as LPIPS computes one in VGG16's without its learned
    heads: at the ReLU after each of the classifier's convolutions, features unit-normalised along channels, squared
    differences summed over channels and averaged over space, then summed over the taps. Frozen, eval mode (its
    BatchNorms use their running statistics). forward(a, b) -> [N] distances, images in [-1, 1] like LPIPS'."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.net = classifier.features_net
        self.taps = [i for i, layer in enumerate(self.net) if isinstance(layer, nn.ReLU) and isinstance(self.net[i - 1], nn.BatchNorm2d)]
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.net[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                taps.append(x)
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"feature distance: image batches of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
        taps = []
        for images in (a, b):  # a training target (no grad) costs a forward only
            with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
                taps.append(self.features(images))
        total = 0.0
        for fa, fb in zip(*taps):
            fa, fb = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in (fa, fb))
            total = total + (fa - fb).pow(2).sum(1).mean((1, 2))
        return total


def save_classifier(out_dir: str | Path, model: Classifier, meta: dict) -> None:
    with atomic_directory(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "classifier.safetensors"))
        (tmp / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_classifier(out_dir: str | Path) -> tuple[Classifier, dict]:
    """-> (classifier in eval mode, its classifier.json). One-line CheckpointError when it is missing."""
    directory = Path(out_dir)
    try:
        meta = json.loads((directory / "classifier.json").read_text())
        state = load_file(str(directory / "classifier.safetensors"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no trained classifier (run the classifier stage first)") from None
    model = Classifier(meta["channels"], meta["num_classes"], meta["width"], meta["feature_dim"])
    model.load_state_dict(state)
    return model.eval(), meta
