"""The whole pipeline as a user runs it: tiny-profile `dvc repro` (both model families) in a fresh
copy of the project, tracked by a real `mlflow server`, then the FID gate both ways and loading
each family's champion back."""

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
                                      registry={"gan": {"model_name": "tiny-gan", "fid_threshold": 1000.0},
                                                "ldm": {"model_name": "tiny-ldm", "fid_threshold": 1000.0}}))  # fmt: skip
    result = run_cli(["dvc", "repro"], project, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return project, result


def test_repro_writes_every_declared_output(pipeline):
    project, result = pipeline
    for path in ("data/prepared/manifest.json", "models/classifier/classifier.safetensors", "data/ref_stats/inception.npz",
                 "data/ref_stats/classifier.npz", "models/gan/generator.safetensors", "metrics/gan_losses.csv",
                 "models/autoencoder/diffusion_pytorch_model.safetensors", "metrics/autoencoder.json",
                 "data/latents/latents.safetensors", "models/ldm/unet/diffusion_pytorch_model.safetensors",
                 "models/ldm/vae/config.json", "models/ldm/scheduler/scheduler_config.json", "metrics/ldm_losses.csv",
                 "metrics/eval/gan.json", "metrics/eval/ldm.json", "metrics/register/gan.json", "metrics/register/ldm.json",
                 "dvc.lock"):  # fmt: skip
        assert (project / path).exists(), path
    for family in ("gan", "ldm"):
        metrics = json.loads((project / f"metrics/eval/{family}.json").read_text())
        assert set(metrics) >= {"fid", "kid", "fid_classifier", "class_accuracy", "precision", "recall"}
        assert metrics["family"] == family and 0 < metrics["fid"] < 1000 and 0 <= metrics["class_accuracy"] <= 1
    assert json.loads((project / "metrics/eval/ldm.json").read_text())["sampler"] == "dpmsolver++"
    autoencoder = json.loads((project / "metrics/autoencoder.json").read_text())
    assert autoencoder["psnr_db"] > 5 and autoencoder["fid"] > 0 and autoencoder["scaling_factor"] > 0
    losses = (project / "metrics/gan_losses.csv").read_text().splitlines()
    assert losses[0] == "step,d_loss,g_loss,img_per_s" and losses[-1].startswith("20,")
    assert (project / "metrics/ldm_losses.csv").read_text().splitlines()[0] == "step,loss,img_per_s"
    assert "gate: PROMOTED tiny-gan v1 -> @champion" in result.stdout
    assert "gate: PROMOTED tiny-ldm v1 -> @champion" in result.stdout
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
    from gen_core.sampling import to_uint8
    import torch

    again = to_uint8(G.sample(torch.tensor([0, 3, 9]), [1, 2, 3])).numpy()
    assert np.array_equal(images, again)
    version = mlflow.MlflowClient().get_model_version_by_alias("tiny-gan", "champion")
    assert {"fid", "data_hash", "fid_feature_sha256", "gate"} <= set(version.tags) and version.tags["gate"] == "promoted"


def test_ldm_champion_loads_and_generates_the_same_images_as_its_export(pipeline, mlflow_server):
    import mlflow
    import torch

    from gen_core.diffusion import DiffusionGenerator
    from gen_core.sampling import to_uint8
    from pipelines.register import load_registered_generator

    project, _ = pipeline
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/tiny-ldm@champion")
    images = model.predict(pd.DataFrame({"label": [0, 3, 9], "seed": [1, 2, 3]}))
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.uint8 and images.std() > 0
    registered = load_registered_generator("models:/tiny-ldm@champion")
    exported, _ = DiffusionGenerator.from_pretrained(project / "models/ldm")  # the diffusers-format export
    for generator in (registered, exported):
        assert np.array_equal(images, to_uint8(generator.sample(torch.tensor([0, 3, 9]), [1, 2, 3])).numpy())
    with pytest.raises(Exception, match="class label out of range"):
        model.predict(pd.DataFrame({"label": [10], "seed": [1]}))
    tags = mlflow.MlflowClient().get_model_version_by_alias("tiny-ldm", "champion").tags
    assert tags["model_family"] == "ldm" and tags["sampler"] == "dpmsolver++" and tags["gate"] == "promoted"


def test_register_is_idempotent(pipeline):
    project, _ = pipeline
    again = run_cli(["python", "-m", "pipelines.register", "--family", "gan", "--require-promotion"], project)
    assert again.returncode == 0
    assert "gate: PROMOTED tiny-gan v1 -> @champion: already champion" in again.stdout


def test_worse_model_is_rejected_and_champion_stays(pipeline, mlflow_server):
    import mlflow

    project, _ = pipeline
    sets = ["--set", "ray.run_name=second", "--set", "gan.total_steps=10", "--set", "gan.checkpoint_every_steps=10",
            "--set", "registry.gan.fid_threshold=0.5"]  # fmt: skip
    for stage in ("train_gan", "evaluate"):
        assert run_cli(["python", "-m", f"pipelines.{stage}", *sets], project).returncode == 0
    rejected = run_cli(["python", "-m", "pipelines.register", "--family", "gan", "--require-promotion", *sets], project)
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
