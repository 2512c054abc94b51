"""Ray Train: a 2-worker DDP run of a few steps, a resume that continues the step count (by one worker, which trains
in the stage's own process, and back on two), a refused
incompatible resume, a run stopped by non-finite losses, data sources on S3 (a real moto_server),
and a worker killed under FSDP."""

import csv
import json

import pytest
import yaml

from tests.conftest import REPO, run_cli, subprocess_env, tiny_params, write_params

pytestmark = pytest.mark.slow


# One worker of 2 CPUs, the default layout (the tiny profile's is 2 x 1, for DDP): it trains in the stage's process
ONE_WORKER = ["--set", "ray.num_workers=1", "--set", "ray.cpus_per_worker=2"]


def losses(path):
    return [int(row["step"]) for row in csv.DictReader(path.read_text().splitlines())]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    params = tiny_params(data={"out_dir": str(root / "prepared")})
    params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
    params["gan"]["evaluation"] = {"every_steps": None}  # training alone: no classifier or reference statistics here
    path = write_params(root, params)
    assert run_cli(["python", "-m", "pipelines.prepare", "--params", str(path)], REPO).returncode == 0
    return root, path


def test_two_workers_then_resume_then_changed_config_trains_afresh(prepared):
    root, params = prepared
    out = root / "gan"
    common = ["python", "-m", "pipelines.train_gan", "--params", str(params), "--set", f"ray.storage_path={root}/ray",
              "--set", f"outputs.gan.out_dir={out}", "--set", "gan.checkpoint_every_steps=5",
              "--set", f"outputs.gan.losses_file={root}/losses.csv", "--set", f"outputs.gan.eval_file={root}/eval.csv"]  # fmt: skip
    first = run_cli([*common, "--set", "gan.total_steps=10"], REPO)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "2 worker(s) on cpu" in first.stdout and "step 10/10" in first.stdout
    first_meta = json.loads((out / "generator.json").read_text())
    assert first_meta["step"] == 10

    # resumed by one worker of 2 CPUs, the default layout: it trains in the stage's own process (no Ray, no
    # "(RayTrainWorker pid=...)" prefix), from the checkpoint the two Ray Train workers wrote
    second = run_cli([*common, "--set", "gan.total_steps=20", *ONE_WORKER], REPO)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from checkpoint at step 10 (ddp, written by 2 worker(s))" in second.stdout and "steps 10->20" in second.stdout
    assert "\n[train_gan] 1 worker(s) on cpu (2 threads each), ddp" in second.stdout and "RayTrainWorker" not in second.stdout
    meta = json.loads((out / "generator.json").read_text())
    assert meta["step"] == 20
    assert meta["mlflow_run_id"] == first_meta["mlflow_run_id"]  # the resumed run continues the same MLflow run
    assert losses(root / "losses.csv") == [5, 10, 15, 20]  # history survives the resume

    # a changed model config does not touch the old run: it trains afresh in its own directory
    changed = run_cli([*common, "--set", "gan.total_steps=5", "--set", "gan.model.g_width=8", *ONE_WORKER], REPO)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "new run genforge-gan-" in changed.stdout and "steps 0->5" in changed.stdout
    assert len([p for p in (root / "ray").iterdir() if p.is_dir()]) == 2
    again = run_cli([*common, "--set", "gan.total_steps=20"], REPO)  # the original run is intact
    assert again.returncode == 0 and "already trained to step 20" in again.stdout
    # an export that fails (its directory's parent is a file) is one line, and leaves the finished training run's status alone
    (root / "blocker").write_text("a file, not a directory")
    blocked = run_cli([*common, "--set", "gan.total_steps=20", "--set", f"outputs.gan.out_dir={root}/blocker/gan"], REPO)
    assert blocked.returncode == 2 and blocked.stderr.strip().splitlines() == [f"error: {root}/blocker: Not a directory"], blocked.stderr
    from mlflow.tracking import MlflowClient

    tracking = yaml.safe_load(params.read_text())["tracking"]["tracking_uri"]
    assert MlflowClient(tracking).get_run(meta["mlflow_run_id"]).info.status == "FINISHED"
    # checkpoint storage on an S3 endpoint that does not answer: one line, before Ray starts
    unreachable = subprocess_env(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    s3 = run_cli([*common, "--set", "gan.total_steps=20", "--set", "ray.storage_path=s3://checkpoints/runs"], REPO, env=unreachable)
    assert s3.returncode == 2 and "Traceback" not in s3.stderr
    assert s3.stderr.strip().splitlines()[0].startswith("error: S3 endpoint http://127.0.0.1:9 unreachable: Could not connect to the endpoint URL")
    # a shorter run than the one stored (`dvc exp run -S gan.total_steps=12`): never the step-20 model exported as the
    # step-12 one; the shorter run trains in a run directory of its own and leaves the longer one alone
    short_out = root / "gan-short"
    shorter = run_cli([*common, "--set", "gan.total_steps=12", "--set", f"outputs.gan.out_dir={short_out}",
                       "--set", f"outputs.gan.losses_file={root}/short-losses.csv", *ONE_WORKER], REPO)  # fmt: skip
    assert shorter.returncode == 0, shorter.stderr[-2000:]
    assert "past gan.total_steps 12 with no checkpoint there: a shorter run of its own" in shorter.stdout and "steps 0->12" in shorter.stdout
    assert json.loads((short_out / "generator.json").read_text())["step"] == 12
    assert len(list((root / "ray").glob("genforge-gan-*-to12"))) == 1 and json.loads((out / "generator.json").read_text())["step"] == 20
    # a resume under another strategy would misread the checkpoint: refused in one line before Ray starts
    other = run_cli([*common, "--set", "gan.total_steps=25", "--set", "ray.strategy=fsdp"], REPO)
    assert other.returncode == 2 and "\n" not in other.stderr.strip()
    assert other.stderr.strip().endswith("checkpoint at step 20 was written with ray.strategy=ddp; resume with it, or set gan.run_name to train afresh")

    # weights gone non-finite (its D set to NaN in the newest checkpoint: no valid config produces that in a
    # few steps): the resumed run stops at the first loss check, in one line, and writes nothing. Two Ray Train
    # workers again, in a run directory whose last checkpoints were written in process
    import torch

    checkpoint = sorted(p for p in (root / "ray").glob("genforge-gan-*/checkpoint_0000020") if (p / "state.pt").exists())[-1]
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state["D"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state["D"].items()}
    torch.save(state, checkpoint / "state.pt")
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "files": {**meta["files"], "state.pt": (checkpoint / "state.pt").stat().st_size}}))
    diverged = run_cli([*common, "--set", "gan.total_steps=30"], REPO)
    assert diverged.returncode == 2, diverged.stderr[-2000:]
    # one line: the workers' and Ray's tracebacks are in the run's log file, not on the console
    run_log = f"logs/{checkpoint.parent.name}.log"
    assert diverged.stderr.strip().splitlines() == [
        f"error: training failed: FloatingPointError: non-finite loss at step 25: d_loss=nan g_loss=nan (worker logs: {run_log})"]
    assert "Traceback" not in diverged.stdout and "Traceback" in (REPO / run_log).read_text()
    # the stage's Ray has no dashboard (Ray's start-up line, in this run's section, names none); Train's placement-group
    # cleaner cannot reach a State API, and its warning about that (every second of every run) is left out of the log
    from pipelines.ray_env import NO_STATE_API

    whole_log = (REPO / run_log).read_text()
    this_run = whole_log.rsplit("\n--- ", 1)[-1]  # the log is appended to, a "--- date pid" line a run
    assert "Started a local Ray instance." in this_run and "View the dashboard" not in this_run, this_run[:2000]
    assert "(RayTrainWorker stderr)" in this_run and NO_STATE_API not in this_run
    # nor the autoscaler's status report (every 5 s of every Ray Train run this log has sections of)
    assert "Autoscaler status" not in whole_log and "The autoscaler took" not in whole_log
    assert json.loads((out / "generator.json").read_text())["step"] == 20 and losses(root / "losses.csv")[-1] == 20
    assert not any((checkpoint.parent / f"checkpoint_{step:07d}").exists() for step in (25, 30))  # nothing written after step 20

    # the newest checkpoint tampered with (a state.pt the safe loader refuses, sizes in meta.json matching): skipped
    # in one line naming it in storage, the run resumes from the one before, and keeps checkpoints_to_keep of them
    tampered = _tamper(checkpoint)
    fallback = run_cli([*common, "--set", "gan.total_steps=30"], REPO)
    assert fallback.returncode == 0, fallback.stderr[-2000:]
    assert f"skipping unreadable checkpoint {checkpoint}: {checkpoint}/state.pt: unreadable (refused by the safe loader" in fallback.stdout
    assert "tmp" not in fallback.stdout.split("skipping unreadable checkpoint")[1].splitlines()[0].replace(str(root), "")
    assert "resumed from checkpoint at step 15" in fallback.stdout
    assert json.loads((out / "generator.json").read_text())["step"] == 30
    kept = sorted(p.name for p in checkpoint.parent.glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2 and kept[-1].startswith("checkpoint_0000030_"), kept  # new names never collide with the skipped one
    assert not checkpoint.exists() or (checkpoint / "state.pt").read_bytes() == tampered  # retired, never overwritten


def _tamper(checkpoint) -> bytes:
    """Replace state.pt by a pickle that weights_only loading refuses; keep meta.json's sizes consistent."""
    import argparse

    import torch

    torch.save({"G": argparse.Namespace(payload="code, not data")}, checkpoint / "state.pt")
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "files": {**meta["files"], "state.pt": (checkpoint / "state.pt").stat().st_size}}))
    return (checkpoint / "state.pt").read_bytes()


def test_a_run_whose_only_checkpoint_cannot_load_stops_and_never_overwrites_it(prepared):
    """Found on a copy of a real run: the driver said "resuming from step 2000", the worker skipped the
    unreadable checkpoint, trained from step 0 for ten minutes and overwrote it. Also: malformed meta.json."""
    root, params = prepared
    common = ["python", "-m", "pipelines.train_gan", "--params", str(params), "--set", f"ray.storage_path={root}/ray-only",
              "--set", f"outputs.gan.out_dir={root}/only", "--set", f"outputs.gan.losses_file={root}/only.csv",
              "--set", f"outputs.gan.eval_file={root}/only.eval.csv", "--set", "gan.checkpoint_every_steps=5"]  # fmt: skip
    assert run_cli([*common, "--set", "gan.total_steps=5", *ONE_WORKER], REPO).returncode == 0
    (checkpoint,) = (p for p in (root / "ray-only").glob("*/checkpoint_*") if p.is_dir())
    tampered = _tamper(checkpoint)
    refused = run_cli([*common, "--set", "gan.total_steps=10"], REPO)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "worker(s) on" not in refused.stdout  # answered by the driver, before Ray starts
    assert f"{checkpoint.parent}: none of its 1 checkpoint(s) can be loaded" in refused.stderr and f"{checkpoint}/state.pt: unreadable" in refused.stderr
    assert (checkpoint / "state.pt").read_bytes() == tampered and [p.name for p in checkpoint.parent.glob("checkpoint_*") if p.is_dir()] == [checkpoint.name]

    for bad, why in (("[]", "meta.json is malformed"), ("{}", "meta.json is malformed"), ("{not json", "meta.json is not JSON")):
        (checkpoint / "meta.json").write_text(bad)
        result = run_cli([*common, "--set", "gan.total_steps=10"], REPO)
        assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
        assert f"skipping checkpoint {checkpoint}: {why}" in result.stdout
        assert result.stderr.strip().splitlines() == [
            f"error: {checkpoint.parent}: none of its 1 checkpoint(s) is complete, so this run will not start over from step 0 on top "
            f"of them; newest: {checkpoint}: {result.stdout.split(f'skipping checkpoint {checkpoint}: ')[1].splitlines()[0]}. "
            "Repair or remove them, or set gan.run_name to train afresh"]


def test_s3_idx_source(tmp_path, moto_s3, real_digits):
    """IDX files read from S3 (a real moto_server). Training with checkpoints on S3, and the export
    read back from there, is tests/test_multinode.py's job-submit test."""
    import boto3

    from tests.test_data import make_idx_dir, mixed

    images, labels = mixed(*real_digits, per_class=60)
    local = make_idx_dir(tmp_path / "idx", images, labels)
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="genforge")
    for file in local.iterdir():
        s3.upload_file(str(file), "genforge", f"mnist/{file.name}")

    params = tiny_params(data={"source": "mnist", "source_uri": "s3://genforge/mnist", "eval_images": 100,
                               "out_dir": str(tmp_path / "prepared")})  # fmt: skip
    path = write_params(tmp_path, params)
    assert run_cli(["python", "-m", "pipelines.prepare", "--params", str(path)], REPO).returncode == 0
    manifest = json.loads((tmp_path / "prepared/manifest.json").read_text())
    assert manifest["source_uri"] == "s3://genforge/mnist" and manifest["splits"]["train"]["count"] == 300


def test_s3_image_folder(tmp_path, moto_s3, real_digits):
    import boto3

    from tests.test_data import make_image_folder

    local = make_image_folder(tmp_path / "folder", *real_digits, per_class=8)
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="images")
    for file in local.rglob("*.*"):
        s3.upload_file(str(file), "images", f"set/{file.relative_to(local)}")
    bad = "set/class_2/broken.png"
    s3.put_object(Bucket="images", Key=bad, Body=b"\x89PNG\r\n\x1a\n truncated")
    # 24 images: evaluation settings that fit them (prepare refuses, in one line, settings a dataset cannot satisfy)
    params = tiny_params(data={"source": "image_folder", "source_uri": "s3://images/set", "eval_images": 10, "out_dir": str(tmp_path / "prepared")},
                         evaluate={"kid_subset_size": 10, "pr_neighbors": 1, "protocols": {"quick": {"num_samples": 12}}})  # fmt: skip
    path = write_params(tmp_path, params)
    failed = run_cli(["python", "-m", "pipelines.prepare", "--params", str(path)], REPO)
    assert failed.returncode == 2
    assert failed.stderr.strip().startswith("error: s3://images/set/class_2/broken.png: corrupt or unreadable image (")
    assert "\n" not in failed.stderr.strip()
    assert not (tmp_path / "prepared").exists()
    skipped = run_cli(["python", "-m", "pipelines.prepare", "--params", str(path), "--set", "data.on_bad_image=skip"], REPO)
    assert skipped.returncode == 0
    manifest = json.loads((tmp_path / "prepared/manifest.json").read_text())
    assert manifest["class_names"] == ["class_0", "class_1", "class_2"] and manifest["splits"]["train"]["count"] == 14
    assert [s["file"] for s in manifest["skipped"]] == ["s3://images/set/class_2/broken.png"]
    assert manifest["skipped"][0]["reason"].startswith("corrupt or unreadable image")


def test_killed_worker_restarts_from_latest_checkpoint(prepared):
    """A real fault under FSDP: SIGKILL the rank-0 training process after its first checkpoint. With
    ray.max_failures=1 the worker group restarts from the newest complete checkpoint (sharded, one file
    per rank), loses at most one checkpoint interval, says so in its log and in MLflow, and finishes."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    root, params = prepared
    out = root / "killed"
    cmd = ["python", "-m", "pipelines.train_gan", "--params", str(params), "--set", f"ray.storage_path={root}/ray-kill",
           "--set", "ray.max_failures=1", "--set", "ray.strategy=fsdp", "--set", "gan.total_steps=30",
           "--set", "gan.checkpoint_every_steps=10", "--set", "gan.log_every_steps=50", "--set", f"outputs.gan.out_dir={out}",
           "--set", f"outputs.gan.losses_file={root}/killed.csv", "--set", f"outputs.gan.eval_file={root}/killed.eval.csv"]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, killed_pid, saved_before_kill = [], None, None
    deadline = time.monotonic() + 300
    for line in process.stdout:
        lines.append(line)
        saved = re.search(r"\[train_gan\] checkpoint at step (\d+)", line)
        if saved and killed_pid is None:
            saved_before_kill = int(saved.group(1))
            killed_pid = int(re.search(r"pid=(\d+)", line).group(1))
            os.kill(killed_pid, signal.SIGKILL)
        assert time.monotonic() < deadline, "training did not finish in time"
    process.wait(60)
    output = "".join(lines)
    sys.stdout.write(output[-4000:])
    assert killed_pid is not None and process.returncode == 0
    resumed = [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+) \(fsdp, written by 2 worker", output)]
    # at most one interval lost: it resumes from the checkpoint reported just before the kill (or a later one)
    assert resumed and resumed[0] >= saved_before_kill and resumed[0] % 10 == 0 and resumed[0] < 30
    meta = json.loads((out / "generator.json").read_text())
    assert meta["step"] == 30 and losses(root / "killed.csv")[-1] == 30
    history = MlflowClient(yaml.safe_load(params.read_text())["tracking"]["tracking_uri"]).get_metric_history(meta["mlflow_run_id"], "resumed_from_step")
    assert [m.value for m in history] == [resumed[0]]  # the restart is on record in MLflow
