"""Evaluation during training on a real 2-worker Ray Train run: the curve at every evaluation step
(samples spread over both ranks), the best checkpoint exported rather than the last, early stopping
after `patience` evaluations without improvement, and a rerun that exports instead of training on."""

import csv
import json
import re

import mlflow
import pytest

from tests.conftest import REPO, run_cli, tiny_params, upstream_sections, write_params

pytestmark = pytest.mark.slow


def rows(path):
    return list(csv.DictReader(path.read_text().splitlines()))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_upstream):
    """The session's prepare -> classifier -> ref_stats; this module's runs and MLflow store of its own."""
    root = tmp_path_factory.mktemp("evaluation")
    params = tiny_params(**upstream_sections(tiny_upstream))
    params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
    return root, write_params(root, params)


def test_training_evaluates_exports_the_best_checkpoint_and_stops_early(upstream):
    root, params = upstream
    out = root / "gan"
    command = ["python", "-m", "pipelines.train_gan", "--params", str(params), "--set", f"ray.storage_path={root}/ray",
               "--set", f"outputs.gan.out_dir={out}", "--set", f"outputs.gan.losses_file={root}/losses.csv",
               "--set", f"outputs.gan.eval_file={root}/eval.csv", "--set", "gan.total_steps=80", "--set", "gan.checkpoint_every_steps=10",
               "--set", "gan.checkpoints_to_keep=1", "--set", "gan.evaluation={every_steps: 10, num_samples: 60, patience: 1, collapse_warning: 1.0}"]  # fmt: skip
    first = run_cli(command, REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    curve = rows(root / "eval.csv")
    steps = [int(r["step"]) for r in curve]
    values = [float(r["fid_classifier"]) for r in curve]
    assert steps == list(range(10, steps[-1] + 1, 10)) and {"class_accuracy", "recall_classifier", "diversity"} <= set(curve[0])
    assert first.stdout.count("evaluation at step ") == len(steps)
    # collapse watch: at 1.0 every class less varied than the real images is named, with its diversity ratio
    warned = re.findall(r"mode collapse suspected: class (\d) \(([a-z0-9-]+)\) diversity ([\d.]+) of real at step 10\n", first.stdout)
    assert warned and all(float(ratio) < 1.0 for *_, ratio in warned), first.stdout[-3000:]
    assert {"min_class_diversity", "classes_covered"} <= set(curve[0])
    assert float(curve[0]["min_class_diversity"]) == pytest.approx(min(float(r) for *_, r in warned), abs=0.005)

    # the best evaluation is what was exported, though Ray kept only the newest checkpoint
    best = min(range(len(values)), key=values.__getitem__)
    exported = json.loads((out / "generator.json").read_text())
    assert exported["step"] == steps[best], (steps, values)
    assert f"exporting the best evaluated checkpoint: step {steps[best]}" in first.stdout

    # early stopping: the tiny GAN's curve is noisy, so one evaluation without improvement (patience 1)
    # comes well before step 80; the run ends there, one evaluation after its best
    assert steps[-1] < 80 and len(steps) - 1 - best == 1, (steps, values)
    assert f"finished {steps[-1]} steps" in first.stdout

    # the curve is in MLflow too, at its steps
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = mlflow.MlflowClient()
    history = client.get_metric_history(exported["mlflow_run_id"], "during_training/fid_classifier")
    assert sorted(m.step for m in history) == steps
    # ...and the sample grid of every checkpoint, as MLflow's step-keyed image (the run page's step slider)
    images = [f.path for f in client.list_artifacts(exported["mlflow_run_id"], "images") if f.path.endswith(".png")]
    assert sorted(int(path.split("+step+")[1].split("+")[0]) for path in images) == steps and all("images/samples+" in p for p in images)
    # ...and the training data as the run's dataset input, with the content hash the export carries
    (data_input,) = client.get_run(exported["mlflow_run_id"]).inputs.dataset_inputs
    assert data_input.dataset.digest == exported["data_hash"] and data_input.dataset.name == "mnist5k-prepared"
    assert [tag.value for tag in data_input.tags if tag.key == "mlflow.data.context"] == ["training"]

    # a rerun neither trains on past the early stop nor exports another checkpoint
    again = run_cli(command, REPO)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"stopped early at step {steps[-1]}" in again.stdout and "resuming" not in again.stdout
    assert json.loads((out / "generator.json").read_text())["step"] == steps[best]


def test_a_diffusion_models_checkpoints_are_judged_at_the_evaluations_own_guidance(upstream):
    """`ldm.evaluation.guidance_scale`: the evaluator draws its samples at that scale, not at the sampler's (what the
    export samples with); null keeps the sampler's. A random tiny EDM denoiser in pixel space (its preconditioning keeps
    the samples in range), its class table scaled up so that conditional and unconditional predictions differ: the two
    scales then give other images, and other classifier features."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from gen_core.classifier import classifier_outputs
    from gen_core.config import load_config
    from gen_core.diffusion import build_denoiser, diffusion_generator
    from gen_core.sampling import balanced_labels, to_uint8
    from pipelines.probe import EvaluationSpec, Evaluator, evaluation_spec

    _, params = upstream
    cfg = load_config(params, ["ldm.space=pixel", "ldm.noise.prediction_type=edm", "ldm.min_snr_gamma=null", "ldm.evaluation.guidance_scale=1.5"])
    spec = EvaluationSpec(**evaluation_spec(cfg, "ldm"))
    assert spec.guidance_scale == 1.5 and cfg.ldm.sampler.guidance_scale == 3.0
    assert EvaluationSpec(**evaluation_spec(load_config(params), "ldm")).guidance_scale is None
    worker = SimpleNamespace(device=torch.device("cpu"), ctx=SimpleNamespace(data_uri=cfg.data.out_dir), rank=0, world_size=1)
    evaluator = Evaluator(spec, worker, report=None, restored_meta=None)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg.ldm.denoiser, 1, 32, 10)
    with torch.no_grad():
        denoiser.class_embedding.weight.mul_(100.0)
    generator = diffusion_generator(cfg.ldm, cfg.data, denoiser, None, 10, edm_sigma_data=0.5)
    indices = np.arange(4)
    judged = evaluator._features(generator, indices, None, with_inception=False)["classifier"]

    def features_at(scale: float) -> np.ndarray:
        images = generator.sample(balanced_labels(indices, 10), [spec.seed + int(i) for i in indices], guidance_scale=scale)
        return classifier_outputs(evaluator.classifier, to_uint8(images))[1]

    assert np.allclose(judged, features_at(1.5), atol=1e-5) and not np.allclose(judged, features_at(8.0), atol=1e-3)
