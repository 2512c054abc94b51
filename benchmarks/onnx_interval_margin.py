"""The margins of tests/test_onnx_diffusion.py::test_onnx_runtime_guides_in_the_exports_interval (which runs `margins`)
on this CPU: how much a guidance interval moves an untrained pixel-space net's samples (which must exceed 0.02), against
how far ONNX Runtime's samples are from torch's (which must stay within 0.005), and the share of saturated pixels, per
guidance scale.

    python benchmarks/onnx_interval_margin.py [--scales 4,8,16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.suite_profile import cpu_model  # noqa: E402
from gen_core.config import DenoiserConfig, NoiseScheduleConfig, SamplerConfig  # noqa: E402
from gen_core.diffusion import DiffusionGenerator, build_denoiser, training_schedule  # noqa: E402
from gen_core.onnx_diffusion import OnnxDiffusionGenerator, export_diffusion_onnx, sampling_record  # noqa: E402

# the tests' tiny U-Net (tests/test_diffusion.py's TINY_DENOISER), restated: benchmarks do not import tests (tests/test_architecture.py)
TINY_DENOISER = DenoiserConfig(block_out_channels=(32, 32), attention_levels=1, attention_head_dim=8)


def margins(scale: float) -> dict[str, float]:
    """An untrained pixel-space U-Net (no decoder to damp a change) with its class embedding x10 (an untrained net barely
    uses its labels), DPM-Solver++ 6 guided at `scale` only in sigma (0, 30], exported to ONNX: the largest pixel change
    the interval makes (against guidance everywhere), ONNX Runtime's largest difference from torch, and the share of
    saturated pixels. tests/test_onnx_diffusion.py bounds the first two at guidance 16."""
    torch.manual_seed(5)
    unet = build_denoiser(TINY_DENOISER, channels=1, sample_size=32, num_classes=10).eval()
    with torch.no_grad():
        unet.class_embedding.weight.mul_(10)
    sampler = SamplerConfig(name="dpmsolver++", num_steps=6, guidance_scale=scale, guidance_interval=(0.0, 30.0))
    model = DiffusionGenerator(unet, None, dict(training_schedule(NoiseScheduleConfig()).config), 10, sampler, (1, 32, 32))
    with tempfile.TemporaryDirectory() as directory:
        export_diffusion_onnx(model, directory)
        onnx = OnnxDiffusionGenerator(directory, **json.loads(json.dumps(sampling_record(model))), threads=1)
        labels, seeds = torch.tensor([1, 8]), [3, 4]
        expected = model.sample(labels, seeds)
        everywhere = dataclasses.replace(model, sampler=sampler.model_copy(update={"guidance_interval": None})).sample(labels, seeds)
        onnx_diff = (onnx.sample(labels, seeds) - expected).abs().max().item()
    return {"interval_effect": (expected - everywhere).abs().max().item(), "onnx_vs_torch": onnx_diff,
            "saturated": (expected.abs() > 0.999).float().mean().item()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="4,8,16")
    args = parser.parse_args()
    print(f"{cpu_model()}; bounds: interval effect > 0.02, ONNX vs torch <= 0.005")
    print("| guidance | interval effect (max abs) | ONNX vs torch (max abs) | saturated pixels |\n|---|---|---|---|")
    for scale in (float(s) for s in args.scales.split(",")):
        m = margins(scale)
        print(f"| {scale:g} | {m['interval_effect']:.4f} | {m['onnx_vs_torch']:.4f} | {m['saturated']:.1%} |")


if __name__ == "__main__":
    main()
