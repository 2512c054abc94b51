"""Bringing your own images (README "Your own images"): a folder of class sub-folders of RGB PNG/JPEG at another
resolution, too small for the settings. `prepare` lists every setting that does not fit in one message with values
that do; with those, the stages run from prepare to register on it (the tiny profile's model sizes and step counts)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, run_cli, tiny_params, write_params

pytestmark = pytest.mark.slow

COLOURS = [(1.0, 0.2, 0.2), (0.2, 1.0, 0.2), (0.2, 0.2, 1.0), (1.0, 1.0, 0.2)]


def rgb_folder(root: Path, digits: np.ndarray, labels: np.ndarray, per_class: int) -> Path:
    """Class c: digit c tinted with colour c, 40x40 RGB, PNG and JPEG."""
    for c, colour in enumerate(COLOURS):
        (root / f"colour_{c}").mkdir(parents=True)
        for i, digit in enumerate(digits[labels == c][:per_class]):
            rgb = (digit[..., None] * np.array(colour)).astype(np.uint8)
            fmt = "PNG" if i % 2 else "JPEG"
            Image.fromarray(rgb).resize((40, 40), Image.BICUBIC).save(root / f"colour_{c}" / f"{i}.{fmt.lower()}", format=fmt)
    return root


def test_an_rgb_folder_from_prepare_to_register(tmp_path, real_digits):
    folder = rgb_folder(tmp_path / "images", *real_digits, per_class=25)
    params = tiny_params(data={"source": "image_folder", "source_uri": str(folder), "channels": 3, "resize": "resize",
                               "out_dir": str(tmp_path / "prepared")},
                         classifier={"out_dir": str(tmp_path / "classifier"), "metrics_file": str(tmp_path / "classifier.json")},
                         ref_stats={"out_dir": str(tmp_path / "ref_stats")}, evaluate={"out_dir": str(tmp_path / "eval")},
                         registry={"out_dir": str(tmp_path / "register")},
                         ray={"storage_path": str(tmp_path / "ray"), "num_workers": 1, "cpus_per_worker": 2},  # the default layout
                         outputs={"gan": {"out_dir": str(tmp_path / "gan"), "losses_file": str(tmp_path / "losses.csv"),
                                          "eval_file": str(tmp_path / "eval.csv")}})  # fmt: skip
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    path = write_params(tmp_path, params)

    # 100 images against the profile's 100 eval images, 60 samples, KID subsets of 30: one message, every setting
    refused = run_cli(["python", "-m", "pipelines.prepare", "--params", str(path)], REPO)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"error: {folder}: 100 images in 4 classes are too few for ")
    fixes = dict(re.findall(r"-S (\S+)=(\S+)", line))
    assert {"data.eval_images", "evaluate.kid_subset_size"} <= set(fixes), line
    assert not (tmp_path / "prepared").exists()

    fitted = [arg for key, value in fixes.items() for arg in ("--set", f"{key}={value}")]
    for stage in ("prepare", "classifier", "ref_stats", "train_gan"):
        result = run_cli(["python", "-m", f"pipelines.{stage}", "--params", str(path), *fitted], REPO)
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["shape"] == [3, 32, 32] and manifest["class_names"] == [f"colour_{c}" for c in range(4)]
    for stage in ("evaluate", "register"):
        result = run_cli(["python", "-m", f"pipelines.{stage}", "--family", "gan", "--params", str(path), *fitted], REPO)
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"
    assert re.search(r"^gate: (PROMOTED|REJECTED) genforge-gan v1", result.stdout, re.M), result.stdout
    evaluation = json.loads((tmp_path / "eval" / "quick" / "gan.json").read_text())
    assert evaluation["num_samples"] == int(fixes.get("evaluate.protocols.quick.num_samples", 60))
