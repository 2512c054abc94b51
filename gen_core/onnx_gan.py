"""The GAN generator in ONNX, run by ONNX Runtime: `(z, labels) -> images` with a dynamic batch axis.

`export_gan_onnx` writes the graph of an exported generator (eval mode: batch norms use their running
statistics, so a sample does not depend on its batch) and returns its sha256; `OnnxGanGenerator` samples
through ONNX Runtime with the same seeded latents as the torch path (`gen_core.sampling.seeded_latents`),
so sample i is the same image either way, to float32 rounding (tests/test_onnx_gan.py).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from gen_core.io import atomic_write_bytes, sha256_bytes
from gen_core.models import Generator
from gen_core.sampling import check_labels, seeded_latents

OPSET = 17


def write_onnx(module: torch.nn.Module, example: tuple, inputs: list[str], output: str, path: str | Path) -> str:
    """`module` (eval mode) as ONNX at `path`, written atomically, every axis 0 dynamic -> the file's sha256."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notices
        torch.onnx.export(module.eval(), example, buffer, input_names=inputs, output_names=[output], opset_version=OPSET,
                          dynamic_axes={name: {0: "n"} for name in [*inputs, output]}, dynamo=False)  # fmt: skip
    atomic_write_bytes(Path(path), buffer.getvalue())
    return sha256_bytes(buffer.getvalue())


def export_gan_onnx(generator: Generator, path: str | Path) -> str:
    """Write `generator` as ONNX to `path` (atomically) -> the file's sha256."""
    example = (torch.zeros(2, generator.spec.z_dim), torch.zeros(2, dtype=torch.long))
    return write_onnx(generator, example, ["z", "labels"], "images", path)


def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session on `threads` intra-op threads (default: torch's)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxGanGenerator:
    """The same interface as gen_core.generators.GanGenerator (`num_classes`, `sample(labels, seeds)`), over ONNX Runtime."""

    def __init__(self, path: str | Path, z_dim: int, num_classes: int, threads: int | None = None):
        self.session = ort_session(path, threads)
        self.z_dim, self.num_classes = z_dim, num_classes

    def to(self, device) -> "OnnxGanGenerator":
        return self  # ONNX Runtime's CPU provider: the session decides where it runs

    def images(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.session.run(["images"], {"z": z.astype(np.float32), "labels": labels.astype(np.int64)})[0]

    def sample(self, labels, seeds, device=None, **_) -> torch.Tensor:
        labels = check_labels(labels, self.num_classes)
        z = seeded_latents(seeds, self.z_dim).numpy()
        return torch.from_numpy(self.images(z, labels.numpy())).clamp(-1, 1)
