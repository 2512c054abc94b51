"""The guidance sweep's choice and its refusal, in this process (the sweep itself on a trained model: test_pipeline_e2e)."""

import json

import pytest

from gen_core.config import load_config
from pipelines.common import StageError
from pipelines.evaluation import choose_guidance, guidance_sweep, guidance_table
from tests.conftest import REPO

CURVE = [
    {"guidance": 1.0, "fid": 90.0, "class_accuracy": 0.60, "kid": 0.05, "precision": 0.3, "recall": 0.30, "classes_covered": 8},
    {"guidance": 3.0, "fid": 70.0, "class_accuracy": 0.85, "kid": 0.04, "precision": 0.4, "recall": 0.20, "classes_covered": 6},
    {"guidance": 6.0, "fid": 75.0, "class_accuracy": 0.93, "kid": 0.04, "precision": 0.4, "recall": 0.10, "classes_covered": 3},
    {"guidance": 8.0, "fid": 80.0, "class_accuracy": 0.95, "kid": 0.05, "precision": 0.4, "recall": 0.05, "classes_covered": 1},
]


def test_the_lowest_fid_that_keeps_class_accuracy_is_chosen():
    assert choose_guidance(CURVE, 0.0)["guidance"] == 3.0  # the lowest FID overall
    assert choose_guidance(CURVE, 0.9)["guidance"] == 6.0  # 3.0 draws too many images of the wrong class
    assert choose_guidance(CURVE, 0.99) is None
    record = {"curve": CURVE, "chosen": 6.0, "floor": {"fid": 26.4, "kid": 0.0, "precision": 0.8, "recall": 0.79, "class_accuracy": 0.91,
                                                         "classes_covered": 10}}  # fmt: skip
    table = guidance_table(record)
    assert "| **6** | 75.00 |" in table and "| real-vs-real floor | 26.40 |" in table and table.count("**") == 2


def test_a_gan_export_is_refused_in_one_line_before_anything_is_read(tmp_path):
    (tmp_path / "gan").mkdir()
    (tmp_path / "gan" / "generator.json").write_text(json.dumps({"family": "gan", "step": 5}))
    cfg = load_config(REPO / "params.yaml", [f"outputs.gan.out_dir={tmp_path}/gan", f"ref_stats.out_dir={tmp_path}/nowhere"])
    with pytest.raises(StageError) as err:
        guidance_sweep(cfg, "gan")
    assert str(err.value) == f"{tmp_path}/gan: a gan model has no classifier-free guidance to sweep"
