"""The whole pipeline as a user runs it: tiny-profile `dvc repro` (both model families, every training stage
in the default layout: one worker of 2 CPUs, in the stage's own process) in a fresh copy of the project, tracked
by a real `mlflow server`, then loading each family's champion back, experiments in DVC's temporary
workspaces and queue, and the denoiser on 2 workers under DeepSpeed ZeRO-3 on the same latents, whose worse model the FID
gate rejects. FSDP through the stages: tests/test_train_ray.py (a killed worker), tests/test_multinode.py."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, copy_project, run_cli, tiny_params, write_params

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e")]  # one process: the module set-up is shared
BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")
NO_FLOORS = {"recall_floor": 0.0, "class_accuracy_floor": 0.0}  # 20-step models: the floors are tested in test_gate.py
DEFAULT_LAYOUT = {"num_workers": 1, "cpus_per_worker": 2}  # params.yaml's (the tiny profile's is 2 x 1, for DDP)
TWO_WORKERS = ["--set", "ray.num_workers=2", "--set", "ray.cpus_per_worker=1"]  # the ZeRO-3 test's layout


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mlflow_server):
    project = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    write_params(project, tiny_params(tracking={"tracking_uri": mlflow_server, "experiment": "e2e"}, ray=DEFAULT_LAYOUT,
                                      ldm={"lr_cooldown": 0.5, "evaluation": {"guidance_scale": 1.5}},
                                      registry={"gan": {"model_name": "tiny-gan", "fid_threshold": 1000.0, **NO_FLOORS},
                                                "ldm": {"model_name": "tiny-ldm", "fid_threshold": 1000.0, **NO_FLOORS}}))  # fmt: skip
    result = run_cli(["dvc", "repro"], project, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return project, result


def test_repro_writes_every_declared_output(pipeline):
    project, result = pipeline
    for path in ("data/prepared/manifest.json", "models/classifier/classifier.safetensors", "data/ref_stats/quick/inception.npz",
                 "data/ref_stats/quick/classifier.npz", "data/ref_stats/quick/floor.json", "models/gan/generator.safetensors", "metrics/gan_losses.csv",
                 "models/autoencoder/diffusion_pytorch_model.safetensors", "metrics/autoencoder.json",
                 "data/latents/latents.safetensors", "models/ldm/unet/diffusion_pytorch_model.safetensors",
                 "models/ldm/vae/config.json", "models/ldm/scheduler/scheduler_config.json", "metrics/ldm_losses.csv",
                 "metrics/eval/quick/gan.json", "metrics/eval/quick/ldm.json", "metrics/register/gan.json", "metrics/register/ldm.json",
                 "dvc.lock"):  # fmt: skip
        assert (project / path).exists(), path
    for family in ("gan", "ldm"):
        metrics = json.loads((project / f"metrics/eval/quick/{family}.json").read_text())
        assert set(metrics) >= {"fid", "kid", "fid_classifier", "class_accuracy", "precision", "recall", "classifier_score",
                                "recall_per_class", "classes_covered", "diversity_per_class", "fid_classifier_per_class"}
        assert metrics["family"] == family and 0 < metrics["fid"] < 1000 and 0 <= metrics["class_accuracy"] <= 1
        assert metrics["protocol"] == "quick" and metrics["protocol_id"].startswith("quick:60-vs-eval100:inception-")
        assert len(metrics["recall_per_class"]) == 10 and 1 <= metrics["classifier_score"] <= 10
        floor = json.loads((project / "data/ref_stats/quick/floor.json").read_text())
        assert metrics["floor"]["fid"] == floor["fid"] and floor["protocol_id"] == metrics["protocol_id"]
        assert floor["fid"] < metrics["fid"] and floor["class_accuracy"] > 0.8  # real images: the classifier knows them
    assert json.loads((project / "metrics/eval/quick/ldm.json").read_text())["sampler"] == "heun"
    autoencoder = json.loads((project / "metrics/autoencoder.json").read_text())
    assert autoencoder["psnr_db"] > 5 and autoencoder["fid"] > 0 and autoencoder["scaling_factor"] > 0
    losses = (project / "metrics/gan_losses.csv").read_text().splitlines()
    assert losses[0] == "step,d_loss,g_loss,img_per_s" and losses[-1].startswith("20,")
    assert (project / "metrics/ldm_losses.csv").read_text().splitlines()[0] == "step,loss,img_per_s"
    # the denoiser's rate: constant for the first half of its 20 steps, then the cosine cooldown (its optimizer's state)
    import torch

    from gen_core.training import cooldown

    rates = {c.name: torch.load(c / "state.pt", weights_only=True)["opt_unet"]["param_groups"][0]["lr"]
             for c in (project / "runs/ray").glob("genforge-ldm-*/checkpoint_00000[12]0")}  # fmt: skip
    assert rates == {"checkpoint_0000010": 1e-3, "checkpoint_0000020": pytest.approx(1e-3 * cooldown(19, 20, 0.5))}, rates
    assert 0 < rates["checkpoint_0000020"] < 1e-4
    # the denoiser's checkpoints judged at ldm.evaluation.guidance_scale, the export sampled at the sampler's (params.yaml's 3)
    assert "[train_ldm] evaluation at step 10 at guidance 1.5: " in result.stdout
    assert json.loads((project / "metrics/eval/quick/ldm.json").read_text())["guidance_scale"] == 3.0
    # judged at steps 10 and 20, the denoiser exports its last step (ldm.evaluation.export: last), not the judge's pick
    assert json.loads((project / "models/ldm/generator.json").read_text())["step"] == 20
    assert "[train_ldm] exporting the best evaluated checkpoint" not in result.stdout
    # every training stage in its own process: no Ray started (its worker lines would carry "(RayTrainWorker pid=...)",
    # and its start-up lines go to logs/<run>.log)
    assert result.stdout.count("\n[train_autoencoder] 1 worker(s) on cpu, ddp") + result.stdout.count("\n[train_ldm] 1 worker(s) on cpu, ddp") == 2
    assert "\n[train_gan] 1 worker(s) on cpu (2 threads each), ddp" in result.stdout
    assert "RayTrainWorker" not in result.stdout and not (project / "logs").exists()
    assert "[floor " in result.stdout  # every report shows the floor next to the value
    assert "gate: PROMOTED tiny-gan v1 -> @champion" in result.stdout
    assert "gate: PROMOTED tiny-ldm v1 -> @champion" in result.stdout
    for export in ("models/gan/generator.json", "models/ldm/generator.json"):  # shared through DVC: no path of this machine
        assert str(project) not in (project / export).read_text(), export
    shown = run_cli(["dvc", "metrics", "show", "--json"], project)
    assert "fid" in shown.stdout


def test_renaming_one_familys_run_leaves_the_other_familys_stages_up_to_date(pipeline):
    """`dvc exp run -S gan.run_name=fresh` (train the GAN afresh) reruns the GAN's stages only: the run's name is
    per family, so the autoencoder, latents and denoiser stay up to date."""
    project, _ = pipeline
    params = project / "params.yaml"
    original = params.read_text()
    try:
        before = set(json.loads(run_cli(["dvc", "status", "--json"], project).stdout or "{}"))
        changed = yaml.safe_load(original)
        changed["gan"]["run_name"] = "fresh"
        params.write_text(yaml.safe_dump(changed, sort_keys=False))
        stale = set(json.loads(run_cli(["dvc", "status", "--json"], project).stdout or "{}")) - before
        assert "train_gan" in stale and not stale & {"train_autoencoder", "encode_latents", "train_ldm", "evaluate@ldm", "register@ldm"}, stale
    finally:
        params.write_text(original)


def test_an_experiment_in_a_temporary_workspace_keeps_its_run_and_a_failed_one_leaves_params_alone(pipeline):
    """`dvc exp run --temp -S gan.total_steps=24`: DVC runs the changed stages in a copy of the workspace (the
    upstream outputs checked out from its cache) and deletes the copy once it has collected the outs into the
    experiment. The run's checkpoints and worker logs are not DVC outs: they stay in the project (DVC_ROOT), so the
    experiment resumes the workspace's 20-step run and its checkpoint outlives the copy. A failing experiment
    leaves params.yaml byte for byte as it was, with the stage's one-line error in DVC's output. A queued experiment
    (`dvc exp run --queue`, `dvc queue start`) runs the same way in the queue's background worker."""
    project, _ = pipeline
    params = project / "params.yaml"
    original = params.read_text()
    (run,) = (project / "runs" / "ray").glob("genforge-gan-*")
    for command in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "dvc repro"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)  # as after any `dvc repro`: dvc.lock and metrics/ committed

    ran = run_cli(["dvc", "exp", "run", "--temp", "-n", "longer-gan", "-S", "gan.total_steps=24"], project, timeout=900)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    assert "resuming" in ran.stdout.lower() and "step 24/24" in ran.stdout
    for untouched in ("train_autoencoder", "encode_latents", "train_ldm", "evaluate@ldm", "register@ldm"):  # the cache's outputs
        assert f"Running stage '{untouched}'" not in ran.stdout, untouched
    assert (run / "checkpoint_0000024").is_dir()  # in the project (a Ray Train run's log too: logs/<run>.log, beside runs/)
    assert params.read_text() == original and not list(project.glob(".dvc/tmp/exps/tmp*"))
    shown = json.loads(run_cli(["dvc", "exp", "show", "--json", "--no-fetch"], project).stdout)
    experiments = {exp["name"]: exp for row in shown for exp in (row.get("experiments") or []) for exp in (exp.get("revs") or [])}
    assert experiments["longer-gan"]["data"]["params"]["params.yaml"]["data"]["gan"]["total_steps"] == 24, experiments
    # readable: the changed params and at most the GAN's changed metrics (DVC leaves the per-class lists out; floors do not change)
    header = run_cli(["dvc", "exp", "show", "--only-changed", "--csv", "--no-fetch"], project).stdout.splitlines()[0].split(",")
    columns = [c for c in header if c not in ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")]
    assert "gan.total_steps" in columns and len(columns) <= 25, columns
    assert all(c == "gan.total_steps" or (c.startswith("metrics/") and ":floor." not in c and "ldm" not in c) for c in columns), columns

    failed = run_cli(["dvc", "exp", "run", "--temp", "-S", "gan.total_steps=0"], project)
    assert failed.returncode != 0
    assert "error: " in failed.stdout + failed.stderr and "gan.total_steps" in failed.stdout + failed.stderr
    assert params.read_text() == original

    # the queue runs in temporary workspaces too: `dvc exp run --queue`, then `dvc queue start` (a background worker)
    queued = run_cli(["dvc", "exp", "run", "--queue", "-n", "queued-gan", "-S", "gan.total_steps=26"], project)
    assert queued.returncode == 0 and params.read_text() == original, queued.stdout + queued.stderr
    assert run_cli(["dvc", "queue", "start"], project).returncode == 0
    deadline, status = time.monotonic() + 600, ""
    while not re.search(r"queued-gan\s.*\b(Success|Failed)\b", status) and time.monotonic() < deadline:
        time.sleep(3)
        status = run_cli(["dvc", "queue", "status"], project).stdout
    run_cli(["dvc", "queue", "stop"], project)
    logs = run_cli(["dvc", "queue", "logs", "queued-gan"], project).stdout
    assert re.search(r"queued-gan\s.*\bSuccess\b", status), status + logs[-3000:]
    assert "resuming" in logs.lower() and "step 26/26" in logs and (run / "checkpoint_0000026").is_dir()  # the project's run, resumed
    shown = json.loads(run_cli(["dvc", "exp", "show", "--json", "--no-fetch"], project).stdout)
    experiments = {exp["name"]: exp for row in shown for exp in (row.get("experiments") or []) for exp in (exp.get("revs") or [])}
    assert experiments["queued-gan"]["data"]["params"]["params.yaml"]["data"]["gan"]["total_steps"] == 26
    assert params.read_text() == original and not list(project.glob(".dvc/tmp/exps/tmp*"))


def test_outputs_go_to_an_s3_remote_and_come_back(pipeline, moto_s3):
    """README "Sharing data and models": `dvc push` to an S3 remote (a real moto_server), then a deleted model is
    restored by `dvc pull`, byte for byte. The remote lives in .dvc/config.local (machine-specific, git-ignored)."""
    import boto3

    project, _ = pipeline
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="dvc-remote")
    for command in (["dvc", "remote", "add", "--local", "-d", "storage", "s3://dvc-remote/genforge"],
                    ["dvc", "remote", "modify", "--local", "storage", "endpointurl", moto_s3]):  # fmt: skip
        assert run_cli(command, project).returncode == 0
    pushed = run_cli(["dvc", "push"], project)
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    objects = boto3.client("s3", endpoint_url=moto_s3).list_objects_v2(Bucket="dvc-remote", Prefix="genforge/")
    assert objects["KeyCount"] > 10
    model = project / "models" / "gan"
    weights = (model / "generator.safetensors").read_bytes()
    cache, aside = project / ".dvc" / "cache", project / "cache-aside"  # a machine without the outputs: no cache either
    shutil.rmtree(model)
    cache.rename(aside)
    try:
        pulled = run_cli(["dvc", "pull", "train_gan"], project)
        assert pulled.returncode == 0, pulled.stderr[-2000:]
        assert (model / "generator.safetensors").read_bytes() == weights
    finally:  # the module's other tests keep the full cache
        shutil.rmtree(cache, ignore_errors=True)
        aside.rename(cache)


def test_champion_loads_and_generates(pipeline, mlflow_server):
    import mlflow

    from pipelines.registry import load_registered_generator

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/tiny-gan@champion")
    images = model.predict(pd.DataFrame({"label": [0, 3, 9], "seed": [1, 2, 3]}))
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.uint8 and images.std() > 0
    G, _ = load_registered_generator("models:/tiny-gan@champion")  # safetensors + JSON only
    from gen_core.sampling import to_uint8
    import torch

    again = to_uint8(G.sample(torch.tensor([0, 3, 9]), [1, 2, 3])).numpy()
    assert np.array_equal(images, again)
    version = mlflow.MlflowClient().get_model_version_by_alias("tiny-gan", "champion")
    assert {"fid", "recall", "protocol_id", "floor_fid", "gate_recall_floor", "data_hash", "fid_feature_sha256", "gate"} <= set(version.tags)
    assert version.tags["gate"] == "promoted"
    card = version.description  # the model card: metrics beside their floor, the gate with its thresholds
    assert "**Gate at registration: promoted**" in card and "| metric | this model | real-vs-real floor |" in card, card
    assert f"| recall | {float(version.tags['recall']):.4g} | {float(version.tags['floor_recall']):.4g} |" in card, card


def test_export_writes_the_champions_in_onnx_tied_to_their_versions(pipeline, mlflow_server, tmp_path):
    """`python -m pipelines.export --family gan|ldm`: each champion in ONNX, the files' digest on the version, the files
    logged to the version's run, ONNX Runtime's images equal to the registered generator's; rerun, nothing is logged
    twice; a version that does not exist, or of the other family, is one line and leaves the export alone."""
    import hashlib

    import mlflow
    import torch

    from gen_core.io import sha256_file
    from gen_core.onnx_diffusion import OnnxDiffusionGenerator
    from gen_core.onnx_gan import OnnxGanGenerator
    from pipelines.registry import load_registered_generator

    project, _ = pipeline
    client = mlflow.MlflowClient(mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    labels, seeds = torch.tensor([0, 3, 9]), [1, 2, 3]
    for family, files in (("gan", ["generator.onnx"]), ("ldm", ["decoder.onnx", "denoiser.onnx"])):
        exported = run_cli(["python", "-m", "pipelines.export", "--family", family], project)
        assert exported.returncode == 0, exported.stderr[-2000:]
        out = project / "models/onnx" / family
        record = json.loads((out / "onnx.json").read_text())
        champion = client.get_model_version_by_alias(f"tiny-{family}", "champion")
        assert record["version"] == int(champion.version) and record["model_uri"] == f"models:/tiny-{family}@champion"
        assert sorted(record["files"]) == files and all(record["files"][name] == sha256_file(out / name) for name in files)
        assert champion.tags["onnx_sha256"] == hashlib.sha256(json.dumps(record["files"], sort_keys=True).encode()).hexdigest()
        logged = Path(mlflow.artifacts.download_artifacts(champion.tags["onnx_artifact"], dst_path=str(tmp_path / family)))
        assert {name: sha256_file(logged / name) for name in files} == record["files"]

        registered, _ = load_registered_generator(f"models:/tiny-{family}@champion")
        if family == "gan":
            onnx = OnnxGanGenerator(out / "generator.onnx", record["inputs"]["z"][1], len(record["class_names"]), threads=1)
        else:
            onnx = OnnxDiffusionGenerator(out, **record["sampling"], threads=1)
        with torch.no_grad():
            assert (onnx.sample(labels, seeds) - registered.sample(labels, seeds)).abs().max() <= 1e-3

        if family == "gan":  # a rerun (the same code path for both families): the same files, nothing logged twice
            again = run_cli(["python", "-m", "pipelines.export", "--model", f"models:/tiny-gan/{champion.version}"], project)
            assert again.returncode == 0 and json.loads((out / "onnx.json").read_text())["files"] == record["files"]
        assert sorted(a.path for a in client.list_artifacts(champion.run_id, f"onnx/v{champion.version}")) == [
            f"onnx/v{champion.version}/{name}" for name in files]
    for args, message in ((["--model", "models:/tiny-gan/99"], "error: --model models:/tiny-gan/99: "),
                          (["--family", "ldm", "--model", "models:/tiny-gan@champion"], "error: --model models:/tiny-gan@champion: a gan model, not ldm")):  # fmt: skip
        refused = run_cli(["python", "-m", "pipelines.export", *args], project)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(message), refused.stderr
        assert "Traceback" not in refused.stderr
    assert json.loads((project / "models/onnx/ldm/onnx.json").read_text())["family"] == "ldm"  # the refused runs left it alone


def test_ldm_champion_loads_and_generates_the_same_images_as_its_export(pipeline, mlflow_server):
    import mlflow
    import torch

    from gen_core.diffusion import DiffusionGenerator
    from gen_core.sampling import to_uint8
    from pipelines.registry import load_registered_generator

    project, _ = pipeline
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/tiny-ldm@champion")
    images = model.predict(pd.DataFrame({"label": [0, 3, 9], "seed": [1, 2, 3]}))
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.uint8 and images.std() > 0
    registered, _ = load_registered_generator("models:/tiny-ldm@champion")
    exported, _ = DiffusionGenerator.from_pretrained(project / "models/ldm")  # the diffusers-format export
    for generator in (registered, exported):
        assert np.array_equal(images, to_uint8(generator.sample(torch.tensor([0, 3, 9]), [1, 2, 3])).numpy())
    with pytest.raises(Exception, match=r"^label 10: not a class of this model \(0 0, 1 1,"):  # one line, before sampling
        model.predict(pd.DataFrame({"label": [10], "seed": [1]}))
    tags = mlflow.MlflowClient().get_model_version_by_alias("tiny-ldm", "champion").tags
    assert tags["model_family"] == "ldm" and tags["sampler"] == "heun" and tags["gate"] == "promoted"


def test_guidance_sweep_measures_one_model_at_each_scale_and_names_the_best_that_keeps_class_accuracy(pipeline, mlflow_server, tmp_path):
    import mlflow

    project, _ = pipeline
    out = ["--set", f"evaluate.out_dir={tmp_path}/eval", "--set", "evaluate.guidance.scales=[3,1]"]
    result = run_cli(["python", "-m", "pipelines.evaluate", "--family", "ldm", "--guidance-sweep", *out,
                      "--set", "evaluate.guidance.class_accuracy_floor=0"], project)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "eval/quick/ldm_guidance.json").read_text())
    exported = json.loads((project / "models/ldm/generator.json").read_text())
    assert [p["guidance"] for p in record["curve"]] == [1.0, 3.0] and record["exported_guidance"] == exported["sampler"]["guidance_scale"]
    assert record["chosen"] == min(record["curve"], key=lambda p: p["fid"])["guidance"]  # every scale is eligible at floor 0
    assert record["protocol_id"] == json.loads((project / "metrics/eval/quick/ldm.json").read_text())["protocol_id"]
    assert record["curve"][0]["fid"] != record["curve"][1]["fid"]  # the scale reaches the sampler
    assert (tmp_path / "eval/quick/ldm_guidance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| **{record['chosen']:g}** |" in result.stdout
    # the curve and its plot are kept with the model's training run
    mlflow.set_tracking_uri(mlflow_server)
    run_id = exported["mlflow_run_id"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "guidance/quick")}
    assert logged == {"guidance/quick/ldm_guidance.json", "guidance/quick/ldm_guidance.png"}
    # benchmarks/quality_rows.py makes it quality.json rows, one a scale; run again, it replaces them
    rows_file = tmp_path / "quality.json"
    rows_file.write_text("[]\n")
    rows_command = [sys.executable, str(REPO / "benchmarks/quality_rows.py"), "--protocol", "quick", "--sweep", str(tmp_path), "--recipe", "tiny",
                    "--generator", str(project / "models/ldm"), "--train-wall-s", "12.5", "--out", str(rows_file)]  # fmt: skip
    for _ in range(2):
        made = subprocess.run(rows_command, capture_output=True, text=True)
        assert made.returncode == 0, made.stderr[-2000:]
    rows = json.loads(rows_file.read_text())
    assert [r["recipe"] for r in rows] == ["tiny g1", "tiny g3"] and [r["fid"] for r in rows] == [p["fid"] for p in record["curve"]]
    assert {r["fid_floor"] for r in rows} == {record["floor"]["fid"]} and rows[1]["protocol"]["id"] == record["protocol_id"]
    assert rows[0]["images_seen"] == record["step"] * exported["config"]["ldm"]["global_batch_size"] and rows[0]["train_wall_s"] == 12.5
    # no scale reaches an unreachable floor: said, and nothing chosen (the choice itself: tests/test_guidance_sweep.py)
    strict = run_cli(["python", "-m", "pipelines.evaluate", "--family", "ldm", "--guidance-sweep", *out,
                      "--set", "evaluate.guidance.scales=[1]", "--set", "evaluate.guidance.class_accuracy_floor=1"], project)  # fmt: skip
    assert strict.returncode == 0 and "no scale reaches class accuracy 1.00" in strict.stdout
    assert json.loads((tmp_path / "eval/quick/ldm_guidance.json").read_text())["chosen"] is None
    # a sampler set for this command alone would go unused (the export samples as exported): refused in one line, unmeasured
    other = run_cli(["python", "-m", "pipelines.evaluate", "--family", "ldm", *out, "--set", "ldm.sampler.guidance_scale=7.5"], project)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr[-2000:]
    assert other.stderr.startswith(f"error: ldm.sampler: guidance_scale 7.5 (the export's: {exported['sampler']['guidance_scale']!r}): "
                                   "evaluate measures the export as it samples; export it with this sampler first")  # fmt: skip
    assert not (tmp_path / "eval/quick/ldm.json").exists()


def test_register_is_idempotent(pipeline):
    project, _ = pipeline
    again = run_cli(["python", "-m", "pipelines.register", "--family", "gan", "--require-promotion"], project)
    assert again.returncode == 0
    assert "gate: PROMOTED tiny-gan v1 -> @champion: already champion" in again.stdout


def test_unreachable_tracking_server_is_one_line(pipeline):
    project, _ = pipeline
    result = run_cli(["python", "-m", "pipelines.register", "--set", "tracking.tracking_uri=http://127.0.0.1:9", "--set", "tracking.server_wait_s=3"], project)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: MLflow tracking server http://127.0.0.1:9: unreachable for 3 s (Connection refused)"]
    assert "retrying for up to 3 s" in result.stdout  # a server restarting is waited for, and the wait is said


def test_model_trained_against_another_tracking_store_is_one_line_before_sampling(pipeline, tmp_path):
    project, _ = pipeline
    for stage in ("evaluate", "register"):
        result = run_cli(["python", "-m", f"pipelines.{stage}", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/other.db"], project)
        assert result.returncode == 2 and "generating" not in result.stdout
        line = result.stderr.strip().splitlines()[-1]  # after MLflow's own lines creating the empty store
        assert line.startswith("error: ") and "models/gan: trained under MLflow run " in line
        assert line.endswith(f"which tracking store sqlite:///{tmp_path}/other.db does not hold; set tracking.tracking_uri to the store it was trained with")


def test_denoiser_under_deepspeed_zero3_is_gated_then_resumes_are_refused(pipeline, mlflow_server, tmp_path):
    """The same latents, an EDM denoiser on the DiT backbone on 2 workers under ZeRO-3 (two-file partitions per rank).
    Its export (a diffusers pipeline whose unet/ carries the DiT's class) is evaluated and, worse than the threshold,
    rejected by the gate while the champion stays. A resume
    with another worker count is refused (ZeRO partitions belong to theirs), and so are latents that do
    not match the autoencoder, both in one line before Ray starts."""
    import shutil

    import mlflow

    project, _ = pipeline
    ldm = ["python", "-m", "pipelines.train_ldm", "--set", "ray.strategy=deepspeed", "--set", "ray.deepspeed.config=cluster_configs/deepspeed/zero3.json",
           *TWO_WORKERS,
           "--set", f"ray.storage_path={tmp_path}/ray", "--set", f"outputs.ldm.out_dir={tmp_path}/ldm", "--set", f"outputs.ldm.losses_file={tmp_path}/ldm.csv", "--set", f"outputs.ldm.eval_file={tmp_path}/ldm_eval.csv",
           "--set", "ldm.checkpoint_every_steps=5", "--set", "ldm.noise.prediction_type=edm", "--set", "ldm.min_snr_gamma=null",
           "--set", "ldm.denoiser.backbone=dit", "--set", "ldm.denoiser.dit={hidden_size: 32, num_layers: 2, num_heads: 2}"]  # fmt: skip
    first = run_cli([*ldm, "--set", "ldm.total_steps=10"], project)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "2 worker(s) on cpu, deepspeed ZeRO-3" in first.stdout and "latent space (4, 8, 8)" in first.stdout and "step 10/10" in first.stdout
    assert "EDM (sigma_data " in first.stdout and "latent space (4, 8, 8), dit of 49,860 parameters" in first.stdout
    assert json.loads((tmp_path / "ldm/unet/config.json").read_text())["_class_name"] == "GenforgeDiT" and (tmp_path / "ldm/unet/genforge_dit.py").is_file()
    meta = json.loads((tmp_path / "ldm/generator.json").read_text())
    assert meta["step"] == 10 and meta["space"] == "latent" and meta["autoencoder"]["latent_channels"] == 4
    assert 0.8 < meta["edm_sigma_data"] < 1.2  # measured on the latents, which encode_latents scaled to unit variance
    (run,) = (tmp_path / "ray").iterdir()
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= {
        p.name for p in (run / "checkpoint_0000010/deepspeed/unet").iterdir()}

    # the gate both ways: the champion (v1, 20 steps) was promoted by the repro; this 10-step model is not good enough
    gated = ["--family", "ldm", "--set", f"outputs.ldm.out_dir={tmp_path}/ldm", "--set", f"evaluate.out_dir={tmp_path}/eval",
             "--set", f"registry.out_dir={tmp_path}/register", "--set", "registry.ldm.fid_threshold=0.5"]  # fmt: skip
    client = mlflow.MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias("tiny-ldm", "champion").version
    new = str(max(int(v.version) for v in client.search_model_versions("name = 'tiny-ldm'")) + 1)
    assert run_cli(["python", "-m", "pipelines.evaluate", *gated], project).returncode == 0
    rejected = run_cli(["python", "-m", "pipelines.register", "--require-promotion", *gated], project)
    assert rejected.returncode == 1
    line = [l for l in rejected.stdout.splitlines() if l.startswith("gate:")]
    assert len(line) == 1 and line[0].startswith(f"gate: REJECTED tiny-ldm v{new}: fid ") and "> threshold 0.50" in line[0]
    assert client.get_model_version_by_alias("tiny-ldm", "champion").version == champion
    assert client.get_model_version("tiny-ldm", new).tags["gate"] == "rejected"

    other_size = run_cli([*ldm, "--set", "ldm.total_steps=15", "--set", "ray.num_workers=1"], project)
    assert other_size.returncode == 2 and "\n" not in other_size.stderr.strip()
    assert "DeepSpeed ZeRO checkpoint at step 10 was written by 2 workers; resume with ray.num_workers=2" in other_size.stderr

    latents = tmp_path / "latents"
    shutil.copytree(project / "data/latents", latents)
    record = json.loads((latents / "latents.json").read_text())
    (latents / "latents.json").write_text(json.dumps({**record, "scaling_factor": record["scaling_factor"] * 2}))
    refused = run_cli([*ldm, "--set", "ldm.total_steps=15", "--set", f"latents.out_dir={latents}"], project)
    assert refused.returncode == 2 and "\n" not in refused.stderr.strip()
    assert refused.stderr.strip().startswith(f"error: {latents}: latents were scaled by ")
    assert json.loads((tmp_path / "ldm/generator.json").read_text())["step"] == 10  # the export is untouched


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium (scripts/setup.sh installs chromium-headless-shell where apt works)")
def test_dvc_plots_render_offline_in_a_browser(pipeline, tmp_path):
    """`dvc plots show` with the template scripts/setup.sh builds (Vega inlined) draws every chart of dvc.yaml's
    top-level plots, with its title, its step axis and a line, in headless Chromium with no network; the sample
    grids are image plots."""
    project, _ = pipeline
    template = REPO / ".dvc" / "offline_template.html"  # what setup.sh writes in every clone
    if "{scripts}" in template.read_text():
        pytest.skip("scripts/setup.sh could not install vega from npm: the template loads it from a CDN (see its warning)")
    shutil.copy(template, project / ".dvc")
    shown = run_cli(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], project)
    assert shown.returncode == 0 and "failed to load" not in shown.stdout + shown.stderr, shown.stdout + shown.stderr
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and "<script src=" not in html  # nothing to fetch
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000", "--dump-dom",
                          (tmp_path / "plots" / "index.html").as_uri()], capture_output=True, text=True, timeout=180).stdout  # fmt: skip
    charts = dom.split('class="vega-embed')[1:]
    titles = [next(iter(p.values()))["title"] for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"] if isinstance(p, dict)]
    assert len(charts) == len(titles), f"{len(charts)} charts drawn for {len(titles)} defined"
    for title in titles:
        (chart,) = [c for c in charts if f">{title}</text>" in c.replace("&quot;", '"')]
        assert ">training step</text>" in chart, title  # the x axis is the step, labelled
        lines = re.findall(r'class="mark-line role-mark[^"]*".*?<path[^>]* d="([^"]+)"', chart, flags=re.S)
        assert any("L" in d for d in lines), f"{title}: no line drawn"
    assert html.count("<img") >= 2 and "models/gan/samples.png" in html and "models/ldm/samples.png" in html


CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMEDRIVER is None or CHROMIUM is None,
                    reason="no chromium + chromedriver (scripts/setup.sh installs Debian's chromium and chromium-driver where apt works)")
def test_demo_serves_the_champions_in_a_real_browser(pipeline, mlflow_server, tmp_path):
    """`python -m pipelines.demo` on 127.0.0.1 with the pipeline's registry, driven by headless Chromium: the GAN
    champion (served by ONNX Runtime from the export of that version) draws the requested grid for a chosen class,
    the diffusion champion too with its sampler settings, the page names each version with its metrics, and a family
    without a champion is one line on the page."""
    import io

    from PIL import Image
    from selenium import webdriver
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pipelines.demo import COLUMNS, SCALE
    from pipelines.ray_env import free_port
    from tests.conftest import subprocess_env

    project, _ = pipeline
    for family in ("gan", "ldm"):  # the demo serves these exports when they hold the champion (the export test made them)
        if not (project / "models/onnx" / family / "onnx.json").exists():
            assert run_cli(["python", "-m", "pipelines.export", "--family", family], project).returncode == 0
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    demos, driver = [], None

    def start_demo(*sets: str) -> str:
        port, log = free_port(), tmp_path / f"demo{len(demos)}.log"
        demos.append(subprocess.Popen([sys.executable, "-m", "pipelines.demo", "--port", str(port), *sets], cwd=project, stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT, env=subprocess_env()))  # fmt: skip
        deadline = time.monotonic() + 120
        while f"http://127.0.0.1:{port}" not in log.read_text():
            assert demos[-1].poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        return f"http://127.0.0.1:{port}/"

    try:
        url = start_demo()
        started = (tmp_path / "demo0.log").read_text()
        assert "gan: tiny-gan v" in started and "via onnxruntime" in started and "Traceback" not in started
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "tiny-gan v" in d.find_element(By.CSS_SELECTOR, "#summary").text)
        summary = driver.find_element(By.CSS_SELECTOR, "#summary").text
        assert "@champion" in summary and "FID" in summary and "[floor" in summary and "served by onnxruntime" in summary, summary
        assert driver.find_element(By.CSS_SELECTOR, "#missing").text == ""  # both families have a champion

        def grid_png() -> Image.Image:  # the grid as the browser received it
            src = driver.find_element(By.CSS_SELECTOR, "#grid img").get_attribute("src")
            data = driver.execute_async_script(
                "const done = arguments[1]; fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => done(Array.from(new Uint8Array(b))));", src)
            return Image.open(io.BytesIO(bytes(data)))

        def click(by: str, selector: str) -> None:
            """Click once the control takes it: while an update is pending, Gradio lays its progress overlay over the
            components, and the browser hands the click to the overlay (seen once, in a suite run of three processes)."""

            def attempt(d) -> bool:
                try:
                    d.find_element(by, selector).click()
                    return True
                except ElementClickInterceptedException:
                    return False

            wait.until(attempt)

        # the GAN: pick the fourth class from the dropdown's list, ask for 8 images
        click(By.CSS_SELECTOR, "#class input")
        option = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#class li[role=option], ul.options li"))[3]
        chosen = option.get_attribute("aria-label")
        option.click()
        assert driver.find_element(By.CSS_SELECTOR, "#class input").get_attribute("value") == chosen
        click(By.CSS_SELECTOR, "#generate")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid img"))
        grid = grid_png()
        assert grid.size == (COLUMNS * 32 * SCALE, 32 * SCALE), grid.size  # one row of 8 images of 32x32, shown at 4x
        assert np.asarray(grid.convert("L"), dtype=np.float32).std() > 5, "the grid is blank"
        driver.save_screenshot(str(tmp_path / "demo-gan.png"))

        # the diffusion model: its sampler controls appear, and a grid comes back
        click(By.XPATH, "//*[@id='family']//label[contains(., 'latent diffusion')]")
        wait.until(lambda d: "tiny-ldm v" in d.find_element(By.CSS_SELECTOR, "#summary").text)
        # the same response shows the sampler controls, which the page may render a moment after the summary
        wait.until(lambda d: any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, "#sampler")))
        first_src = driver.find_element(By.CSS_SELECTOR, "#grid img").get_attribute("src")
        click(By.CSS_SELECTOR, "#generate")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#grid img").get_attribute("src") != first_src)
        assert grid_png().size == (COLUMNS * 32 * SCALE, 32 * SCALE) and "served by onnxruntime" in driver.find_element(By.CSS_SELECTOR, "#summary").text
        driver.save_screenshot(str(tmp_path / "demo-ldm.png"))

        # a registry without a diffusion champion: the page says so in one line and offers the GAN alone
        driver.get(start_demo("--set", "registry.ldm.model_name=no-such-ldm"))
        wait.until(lambda d: "tiny-gan v" in d.find_element(By.CSS_SELECTOR, "#summary").text)
        missing = driver.find_element(By.CSS_SELECTOR, "#missing").get_attribute("textContent").strip()  # one paragraph, one line
        assert missing.startswith("latent diffusion: models:/no-such-ldm@champion: none to show") and "\n" not in missing, missing
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#family label")] == ["GAN"]
    finally:
        if driver is not None:
            driver.quit()
        for demo in demos:
            demo.terminate()
            demo.wait(30)
    assert (tmp_path / "demo-gan.png").stat().st_size > 0 and (tmp_path / "demo-ldm.png").stat().st_size > 0


def test_serve_answers_rest_requests_for_both_champions_in_one_line_errors(pipeline, mlflow_server, tmp_path):
    """`genforge serve MODEL_URI`: MLflow's scoring server for a champion, called by its path with no venv on PATH
    (the `uvicorn: not found` of `mlflow models serve`), on 127.0.0.1; and `mlflow models serve` itself for both
    champions, as the README runs it. PNG answers decode to the registered generator's images; the diffusion model
    takes its sampler settings in the request; a bad request is a 400 with one line and no traceback, and the server
    answers the next one."""
    import base64
    import io
    import urllib.error
    import urllib.request

    import torch
    from PIL import Image

    from gen_core.sampling import to_uint8
    from pipelines.ray_env import free_port
    from pipelines.registry import load_registered_generator
    from tests.conftest import VENV_BIN, _wait_http, subprocess_env

    project, _ = pipeline
    servers = []

    def start(uri: str, mlflow_cli: bool = False) -> str:
        """`genforge serve URI` by its path with no venv on PATH, or (mlflow_cli) the README's `mlflow models serve -m URI
        --env-manager local` as a user runs it with the venv activated (it starts uvicorn by name)."""
        port = free_port()
        log = open(tmp_path / f"serve{len(servers)}.log", "w")
        if mlflow_cli:
            command = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "--port", str(port)]
            env = subprocess_env(PATH=f"{VENV_BIN}:/usr/bin:/bin", MLFLOW_TRACKING_URI=mlflow_server)
        else:
            command, env = [str(VENV_BIN / "genforge"), "serve", uri, "--port", str(port)], subprocess_env(PATH="/usr/bin:/bin")
        # a session of its own: `mlflow models serve` runs uvicorn as its child, which must end with it
        servers.append(subprocess.Popen(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_http(f"http://127.0.0.1:{port}/ping", 120, servers[-1])
        return f"http://127.0.0.1:{port}/invocations"

    def post(url: str, body) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def decoded(records: list[dict]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(r["png"]))))[None] for r in records])

    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    try:
        gan = start("models:/tiny-gan@champion")
        status, body = post(gan, {"dataframe_records": [{"label": 3, "seed": 11}, {"label": "7", "seed": 12}], "params": {"format": "png"}})
        assert status == 200, body
        records = body["predictions"]
        assert [(r["label"], r["class_name"], r["seed"]) for r in records] == [(3, "3", 11), (7, "7", 12)]
        registered, _ = load_registered_generator("models:/tiny-gan@champion")
        with torch.no_grad():
            expected = to_uint8(registered.sample(torch.tensor([3, 7]), [11, 12])).numpy()
        assert decoded(records).shape == (2, 1, 32, 32) and np.array_equal(decoded(records), expected)
        status, body = post(gan, {"dataframe_split": {"columns": ["label", "seed"], "data": [[3, 11]]}})  # arrays, the default
        assert status == 200 and np.array_equal(np.asarray(body["predictions"], dtype=np.uint8), expected[:1])

        for request, message in (
            ({"dataframe_records": [{"label": 12, "seed": 1}]}, "label 12: not a class of this model (0 0, 1 1,"),
            ({"dataframe_records": [{"label": 1, "seed": i} for i in range(65)]}, "65 images: at most 64 a request"),
            ({"dataframe_records": [{"label": 1, "seed": 1}], "params": {"num_steps": 5}}, "num_steps: settings of a diffusion model; this is a gan"),
            ({"dataframe_records": [{"label": 1, "seed": 1}], "params": {"formt": "png"}}, "unknown setting 'formt' in params"),
            ({"dataframe_records": [{"class": 1, "seed": 1}]}, "columns ['class', 'seed']: expected exactly 'label' and 'seed'"),
            (b"{not json", "Invalid input. Ensure that input is a valid JSON formatted string."),
        ):
            status, body = post(gan, request)
            assert status == 400 and body["message"].startswith(message) and "\n" not in body["message"], body
            assert set(body) == {"error_code", "message"} and "Traceback" not in json.dumps(body)
        assert post(gan, {"dataframe_records": [{"label": 0, "seed": 0}]})[0] == 200  # still up

        # MLflow's own command serves the same registered model: the same images; a bad request is a 400 whose message
        # is MLflow's wrapping of the model's one line ("Failed to predict data '<input>'. \nError: <line>"), no traceback
        gan = start("models:/tiny-gan@champion", mlflow_cli=True)
        status, body = post(gan, {"dataframe_records": [{"label": "3", "seed": 11}, {"label": 7, "seed": 12}], "params": {"format": "png"}})
        assert status == 200 and np.array_equal(decoded(body["predictions"]), expected), body
        status, body = post(gan, {"dataframe_records": [{"label": 12, "seed": 1}]})
        assert status == 400 and body["message"].startswith("Failed to predict data") and "Traceback" not in json.dumps(body), body
        assert body["message"].splitlines()[-1].startswith("Error: label 12: not a class of this model (0 0, 1 1,"), body
        assert post(gan, {"dataframe_records": [{"label": 0, "seed": 0}]})[0] == 200  # still up

        ldm = start("models:/tiny-ldm@champion", mlflow_cli=True)
        settings = {"sampler": "ddim", "num_steps": 3, "guidance_scale": 2.0, "format": "png"}
        status, body = post(ldm, {"dataframe_records": [{"label": 0, "seed": 5}, {"label": 9, "seed": 6}], "params": settings})
        assert status == 200, body
        registered, _ = load_registered_generator("models:/tiny-ldm@champion")
        expected = to_uint8(registered.sample(torch.tensor([0, 9]), [5, 6], sampler="ddim", num_steps=3, guidance_scale=2.0)).numpy()
        assert np.array_equal(decoded(body["predictions"]), expected)
        status, body = post(ldm, {"dataframe_records": [{"label": 0, "seed": 5}], "params": {"sampler": "euler"}})
        assert status == 400 and body["message"].splitlines()[-1] == "Error: sampler 'euler': one of ddpm, ddim, dpmsolver++, heun", body
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    assert "Traceback" not in "".join(p.read_text() for p in tmp_path.glob("serve*.log"))
