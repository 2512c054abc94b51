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
from gen_core.sampling import seeded_latents

OPSET = 17


def export_gan_onnx(generator: Generator, path: str | Path) -> str:
    """Write `generator` as ONNX to `path` (atomically) -> the file's sha256."""
    spec = generator.spec
    generator = generator.eval()
    example = (torch.zeros(2, spec.z_dim), torch.zeros(2, dtype=torch.long))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            generator, example, buffer, input_names=["z", "labels"], output_names=["images"], opset_version=OPSET,
            dynamic_axes={"z": {0: "n"}, "labels": {0: "n"}, "images": {0: "n"}}, dynamo=False,
        )  # fmt: skip
    atomic_write_bytes(Path(path), buffer.getvalue())
    return sha256_bytes(buffer.getvalue())


class OnnxGanGenerator:
    """The same interface as gen_core.generators.GanGenerator (`num_classes`, `sample(labels, seeds)`), over ONNX Runtime."""

    def __init__(self, path: str | Path, z_dim: int, num_classes: int, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.z_dim, self.num_classes = z_dim, num_classes

    def to(self, device) -> "OnnxGanGenerator":
        return self  # ONNX Runtime's CPU provider: the session decides where it runs

    def images(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.session.run(["images"], {"z": z.astype(np.float32), "labels": labels.astype(np.int64)})[0]

    def sample(self, labels, seeds, device=None, **_) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class label out of range: got {labels.min().item()}..{labels.max().item()}, model has 0..{self.num_classes - 1}")
        z = seeded_latents(seeds, self.z_dim).numpy()
        return torch.from_numpy(self.images(z, labels.numpy())).clamp(-1, 1)
