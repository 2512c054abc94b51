"""What the demo serves (pipelines.serving, pipelines.demo), without a registry or a browser: an ONNX export is
used only for the very version it was made from and only while its files match their recorded sha256, and the
demo's requests are checked before any sampling. The demo in a real browser: tests/test_pipeline_e2e.py."""

import json

import numpy as np
import pytest
import torch

from gen_core.generators import GanGenerator
from gen_core.io import sha256_file
from gen_core.models import GeneratorSpec, build_generator
from gen_core.onnx_gan import OnnxGanGenerator, export_gan_onnx
from pipelines.demo import COLUMNS, SCALE, generate, grid_image
from pipelines.serving import ServedModel, open_onnx_export

NAMES = [f"class-{i}" for i in range(10)]


@pytest.fixture
def export_dir(tmp_path):
    torch.manual_seed(0)
    generator = build_generator(GeneratorSpec(resolution=32, channels=1, num_classes=10, z_dim=32, width=8, arch="resnet")).eval()
    digest = export_gan_onnx(generator, tmp_path / "generator.onnx")
    record = {"family": "gan", "model_name": "demo-gan", "version": 3, "files": {"generator.onnx": digest}, "inputs": {"z": ["n", 32], "labels": ["n"]}}
    (tmp_path / "onnx.json").write_text(json.dumps(record))
    return tmp_path, GanGenerator(generator)


def test_an_onnx_export_serves_only_its_own_unchanged_version(export_dir):
    directory, torch_generator = export_dir
    served, why = open_onnx_export(directory, "demo-gan", 3, 10)
    assert isinstance(served, OnnxGanGenerator) and why == f"{directory}, sha256-checked"
    labels, seeds = torch.tensor([1, 7]), [5, 6]
    with torch.no_grad():
        assert (served.sample(labels, seeds) - torch_generator.sample(labels, seeds)).abs().max() <= 1e-4

    assert open_onnx_export(directory, "demo-gan", 4, 10) == (None, f"{directory} holds demo-gan v3, not v4")
    assert open_onnx_export(directory, "other-gan", 3, 10)[0] is None
    assert open_onnx_export(directory / "nowhere", "demo-gan", 3, 10) == (None, f"no ONNX export in {directory / 'nowhere'}")
    with open(directory / "generator.onnx", "ab") as onnx:  # changed after the export: not served
        onnx.write(b"\0")
    assert sha256_file(directory / "generator.onnx") != json.loads((directory / "onnx.json").read_text())["files"]["generator.onnx"]
    assert open_onnx_export(directory, "demo-gan", 3, 10) == (None, f"{directory}/generator.onnx does not match its recorded sha256")
    (directory / "onnx.json").write_text("{not json")
    assert open_onnx_export(directory, "demo-gan", 3, 10) == (None, f"{directory}/onnx.json unreadable (JSONDecodeError)")


def _served(generator) -> ServedModel:
    tags = {"fid": "41.5", "floor_fid": "26.4", "recall": "0.31", "floor_recall": "0.79", "class_accuracy": "0.9", "gate": "promoted",
            "protocol_id": "quick:1000-vs-eval1000:inception-fp32:clean"}  # fmt: skip
    return ServedModel(family="gan", model_uri="models:/demo-gan@champion", name="demo-gan", version=3, aliases=["champion"],
                       generator=generator, meta={"class_names": NAMES, "step": 1200}, backend="torch", backend_note="no ONNX export",
                       tags=tags, run_id="abc", run_url="http://127.0.0.1:5000/#/experiments/1/runs/abc")  # fmt: skip


def test_the_demo_draws_the_requested_grid_and_refuses_bad_requests_in_one_line(export_dir):
    _, torch_generator = export_dir
    model = _served(torch_generator)
    grid = generate(model, "class-7", 10, seed=3, cap=64)
    assert grid.shape == (2 * 32 * SCALE, 5 * 32 * SCALE, 3) and grid.dtype == np.uint8  # 10 images: 2 rows (at most 8 a row) of 5
    # the first image is sample (class 7, seed 3), each pixel shown SCALE x SCALE
    with torch.no_grad():
        first = ((torch_generator.sample(torch.tensor([7]), [3])[0, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(grid[: 32 * SCALE : SCALE, : 32 * SCALE : SCALE, 0], first)
    for args, message in (
        (("class-11", 4), "class 'class-11': not a class of demo-gan v3 (class-0, class-1"),
        (("class-1", 0), "0 images: between 1 and 64 (serving.max_images) a request"),
        (("class-1", 65), "65 images: between 1 and 64 (serving.max_images) a request"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            generate(model, *args, seed=0, cap=64)
        assert "\n" not in str(err.value)
    summary = model.summary()
    assert "**demo-gan v3** @champion" in summary and "FID 41.50 [floor 26.40]" in summary and "recall 0.310 [floor 0.790]" in summary
    assert "[abc](http://127.0.0.1:5000/#/experiments/1/runs/abc)" in summary and "served by torch (no ONNX export)" in summary


def test_a_grayscale_grid_is_shown_in_rgb_at_the_demo_scale():
    images = np.full((3, 1, 32, 32), 200, dtype=np.uint8)
    grid = grid_image(images, scale=2)
    assert grid.shape == (64, 3 * 64, 3) and (grid == 200).all()
    assert grid_image(np.zeros((2 * COLUMNS + 1, 1, 32, 32), dtype=np.uint8), scale=1).shape == (3 * 32, 6 * 32, 3)  # 17: 3 rows of 6
