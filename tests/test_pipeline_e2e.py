"""The whole pipeline as a user runs it: tiny-profile `dvc repro` in a fresh copy of the project,
tracked by a real `mlflow server`, then the FID gate both ways and loading the champion back."""

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import copy_project, run_cli, subprocess_env, tiny_params, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mlflow_server):
    project = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    write_params(project, tiny_params(tracking={"tracking_uri": mlflow_server, "experiment": "e2e"},
                                      registry={"model_name": "tiny-gan", "fid_threshold": 1000.0}))  # fmt: skip
    result = run_cli(["dvc", "repro"], project, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return project, result


def test_repro_writes_every_declared_output(pipeline):
    project, result = pipeline
    for path in ("data/prepared/manifest.json", "models/classifier/classifier.safetensors", "data/ref_stats/inception.npz",
                 "data/ref_stats/classifier.npz", "models/gan/generator.safetensors", "metrics/train_losses.csv",
                 "metrics/metrics.json", "metrics/register.json", "dvc.lock"):  # fmt: skip
        assert (project / path).exists(), path
    metrics = json.loads((project / "metrics/metrics.json").read_text())
    assert set(metrics) >= {"fid", "kid", "fid_classifier", "class_accuracy", "precision", "recall"}
    assert 0 < metrics["fid"] < 1000 and 0 <= metrics["class_accuracy"] <= 1
    losses = (project / "metrics/train_losses.csv").read_text().splitlines()
    assert losses[0] == "step,d_loss,g_loss,img_per_s" and losses[-1].startswith("20,")
    assert "gate: PROMOTED tiny-gan v1 -> @champion" in result.stdout
    shown = run_cli(["dvc", "metrics", "show", "--json"], project)
    assert "fid" in shown.stdout


def test_champion_loads_and_generates(pipeline, mlflow_server):
    import mlflow

    from pipelines.register import load_registered_generator

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/tiny-gan@champion")
    images = model.predict(pd.DataFrame({"label": [0, 3, 9], "seed": [1, 2, 3]}))
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.uint8 and images.std() > 0
    G = load_registered_generator("models:/tiny-gan@champion")  # safetensors + JSON only
    from gen_core.sampling import sample_gan, to_uint8
    import torch

    again = to_uint8(sample_gan(G, torch.tensor([0, 3, 9]), [1, 2, 3])).numpy()
    assert np.array_equal(images, again)
    version = mlflow.MlflowClient().get_model_version_by_alias("tiny-gan", "champion")
    assert {"fid", "data_hash", "fid_feature_sha256", "gate"} <= set(version.tags) and version.tags["gate"] == "promoted"


def test_register_is_idempotent(pipeline):
    project, _ = pipeline
    again = run_cli(["python", "-m", "pipelines.register", "--require-promotion"], project)
    assert again.returncode == 0
    assert "gate: PROMOTED tiny-gan v1 -> @champion: already champion" in again.stdout


def test_worse_model_is_rejected_and_champion_stays(pipeline, mlflow_server):
    import mlflow

    project, _ = pipeline
    sets = ["--set", "ray.run_name=second", "--set", "train.total_steps=10", "--set", "train.checkpoint_every_steps=10",
            "--set", "registry.fid_threshold=0.5"]  # fmt: skip
    for stage in ("train_gan", "evaluate"):
        assert run_cli(["python", "-m", f"pipelines.{stage}", *sets], project).returncode == 0
    rejected = run_cli(["python", "-m", "pipelines.register", "--require-promotion", *sets], project)
    assert rejected.returncode == 1
    line = [l for l in rejected.stdout.splitlines() if l.startswith("gate:")]
    assert len(line) == 1 and line[0].startswith("gate: REJECTED tiny-gan v2: fid ") and "> threshold 0.50" in line[0]
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias("tiny-gan", "champion").version == "1"
    assert client.get_model_version("tiny-gan", "2").tags["gate"] == "rejected"


def test_unreachable_tracking_server_is_one_line(pipeline):
    project, _ = pipeline
    result = run_cli(["python", "-m", "pipelines.register", "--set", "tracking.tracking_uri=http://127.0.0.1:9"], project)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: MLflow tracking server http://127.0.0.1:9: unreachable (Connection refused)"]
