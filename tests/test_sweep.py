"""Ray Tune sweeps on a real local Ray: ASHA over the D/G learning-rate ratio (early stops, trials keep
starting after them, best model through the registry gate, every trial in MLflow), PBT that exploits
through a checkpoint hand-off, an interrupted sweep that resumes, and bad sweep configs refused
before any trial starts."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from gen_core.config import ConfigError, load_config
from tests.conftest import REPO, VENV_BIN, run_cli, subprocess_env, tiny_params, upstream_sections, write_params

RATIO_ONLY = {"gan": {"lr_d_over_lr_g": {"type": "loguniform", "low": 0.25, "high": 16.0}}}


def sweep_params(root: Path, **sweep) -> dict:
    params = tiny_params(
        **upstream_sections(root),
        registry={"gan": {"fid_threshold": 10_000.0, "recall_floor": 0.0, "class_accuracy_floor": 0.0}},  # tiny models: the gate itself is tested elsewhere
    )  # fmt: skip
    # a store per sweep: sweeps in two pytest-xdist processes share `root` (the session's upstream)
    params["tracking"]["tracking_uri"] = f"sqlite:///{root}/{sweep.get('name', 'sweep')}.mlflow.db"
    params["sweep"] = {
        **params["sweep"], "enabled": True, "num_trials": 4, "total_steps": 40, "report_every_steps": 10, "global_batch_size": 32,
        "probe_samples": 100, "final_fid_samples": 60, "space": RATIO_ONLY, "storage_path": str(root / "tune"),
        "out_dir": str(root / "sweep"), "metrics_file": str(root / "sweep.json"), **sweep,
    }  # fmt: skip
    return params


@pytest.fixture(scope="module")
def upstream(tiny_upstream):
    """The session's prepare -> classifier -> ref_stats; each sweep writes under its own name beside them."""
    return tiny_upstream


def run_sweep(root: Path, name: str, timeout: int = 600, **sweep) -> tuple[subprocess.CompletedProcess, Path]:
    directory = root / name
    directory.mkdir()
    params = sweep_params(root, name=name, out_dir=str(directory / "out"), metrics_file=str(directory / "sweep.json"), **sweep)
    path = write_params(directory, params)
    return run_cli(["python", "-m", "pipelines.sweep", "--params", str(path)], REPO, timeout=timeout), path


@pytest.mark.parametrize(
    "override, message",
    [
        ("sweep.space.gan={}", "sweep: space.gan: empty search space"),
        ("sweep.space.gan.lr_g={type: loguniform, low: 0.01, high: 0.001}", "inverted or empty range: low 0.01 >= high 0.001"),
        ("sweep.scheduler=hyperband", "sweep.scheduler: Input should be 'asha', 'pbt' or 'fifo'"),
        ("sweep.metric=fid_inception", "metric 'fid_inception': gan trials never report it"),
        ("sweep.space.gan.lr_gen={type: uniform, low: 0.1, high: 0.2}", "space.gan.lr_gen: not a sweepable key"),
    ],
)
def test_bad_sweep_config_is_one_line_before_anything_runs(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "params.yaml", ["sweep.enabled=true", override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_out_of_range_space_value_is_refused_by_the_cli_before_ray_starts(tmp_path):
    params = sweep_params(tmp_path, space={"gan": {"adam_beta1": {"type": "choice", "values": [0.0, 1.5]}}})
    result = run_cli(["python", "-m", "pipelines.sweep", "--params", str(write_params(tmp_path, params))], REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: sweep.space.gan.adam_beta1 = 1.5: ")
    assert "Ray" not in result.stdout and not (tmp_path / "tune").exists()


def test_disabled_sweep_only_records_that_it_is_off(tmp_path):
    params = sweep_params(tmp_path, enabled=False)
    result = run_cli(["python", "-m", "pipelines.sweep", "--params", str(write_params(tmp_path, params))], REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "sweep.json").read_text()) == {"enabled": False}
    assert not (tmp_path / "tune").exists()


@pytest.mark.slow
def test_asha_sweep_over_the_ratio_stops_early_and_registers_the_best(upstream):
    result, params = run_sweep(upstream, "asha")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((upstream / "asha" / "sweep.json").read_text())
    # on 2 cores, 2 trials at a time (1 CPU each: derived from the cluster, not configured)
    assert "2 at a time on 2 CPUs" in result.stdout
    assert record["trials"] == 4 and record["errors"] == 0, record["trial_errors"]
    assert record["stopped_early"] >= 1, record  # ASHA cut at least one trial at a rung
    assert record["completed"] + record["stopped_early"] == 4  # trials kept starting after the early stops
    # 2 at a time, really: the sweep took less than its trials' own time added up (serial trials would take more)
    assert record["wall_s"] < record["sum_trial_s"], record

    # one worker per trial trains in its trial's own process, without Ray Train, which leaves uploading and
    # retiring checkpoints to genforge's store: each trial's run keeps its newest checkpoints_to_keep (2), as Ray Train does
    runs = {run.name: sorted(int(c.name.split("_")[1]) for c in run.glob("checkpoint_*")) for run in (upstream / "tune" / "asha" / "train").iterdir()}
    assert len(runs) == 4 and all(kept == list(range(max(10, kept[-1] - 10), kept[-1] + 1, 10)) for kept in runs.values()), runs
    assert [10 * step for step in (3, 4)] in runs.values(), runs  # a completed trial retired its first two

    # the best configuration is a params overlay the train stage consumes
    out = upstream / "asha" / "out"
    overlay = yaml.safe_load((out / "best_params.yaml").read_text())
    cfg = load_config(params, overlays=[out / "best_params.yaml"])
    assert cfg.gan.lr_d == pytest.approx(overlay["gan"]["lr_d"]) and cfg.gan.lr_d != load_config(params).gan.lr_d
    assert record["dvc_exp_command"].startswith("dvc exp run -S gan.lr_d=")

    # the best model went through the same evaluate + gate as any version, and is the champion now
    decision = json.loads((out / "register" / "gan.json").read_text())
    assert decision["promoted"] and decision["version"] == record["model_version"]
    assert json.loads((out / "eval" / "quick" / "gan.json").read_text())["num_samples"] == 60

    # MLflow: one parent run, one child run per trial with its params and metric curve
    client, parent, children = sweep_runs(upstream, "asha")
    assert len({child.data.tags["tune_trial_id"] for child in children}) == len(children) == 4
    for child in children:
        assert "gan.lr_d" in child.data.params
        # Tune ends a trial's process at its last report, before its run is closed: the sweep closes it by how the trial ended
        assert (child.data.tags["sweep_trial_status"], child.info.status) in {("completed", "FINISHED"), ("stopped early", "KILLED")}
        assert len(client.get_metric_history(child.info.run_id, "during_training/fid_classifier")) >= 1  # the evaluator's curve
    assert parent.data.tags["best_trial"] == record["best_trial"]


def sweep_runs(upstream: Path, name: str) -> tuple:
    """-> (a client of the sweep's MLflow store, its parent run, its child runs)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{upstream}/{name}.mlflow.db")
    experiment = client.get_experiment_by_name("genforge")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.sweep_parent = '{name}'")
    return client, parent, client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


@pytest.mark.slow
def test_pbt_exploits_by_handing_a_checkpoint_over(upstream):
    result, _ = run_sweep(
        upstream, "pbt", scheduler="pbt", num_trials=2, total_steps=20, report_every_steps=10,
        # synchronous: the worse of the two trials exploits the better at the first perturbation point whatever the
        # order in which they report (asynchronous PBT exploited or not depending on the machine's load)
        # one perturbation point (step 10 of 20) is enough to see it; each interval is a Ray Train run per trial
        pbt={"perturbation_interval": 1, "quantile_fraction": 0.5, "resample_probability": 0.5, "synch": True},
        space={"gan": {"lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-3}, "lr_d_over_lr_g": RATIO_ONLY["gan"]["lr_d_over_lr_g"]}},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    handoffs = [json.loads(p.read_text()) for p in (upstream / "tune" / "pbt" / "train").glob("*/checkpoint_handoff_*/meta.json")]
    assert handoffs, "PBT never exploited (no checkpoint was handed over)"
    assert all(h["handoff_from"] and "trial-" in h["handoff_from"] for h in handoffs)
    record = json.loads((upstream / "pbt" / "sweep.json").read_text())
    assert record["completed"] == 2


@pytest.mark.slow
def test_a_trial_of_two_workers_trains_on_a_ray_train_worker_group(upstream):
    """The other sweeps' trials have one worker, which trains in the trial's own process; a trial of several is a Ray
    Train run whose reports reach Tune through its report callback (one at a time here: it takes both CPUs)."""
    result, _ = run_sweep(upstream, "group", scheduler="fifo", num_trials=1, total_steps=20, workers_per_trial=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 at a time on 2 CPUs" in result.stdout and "2 worker(s) on cpu" in result.stdout
    record = json.loads((upstream / "group" / "sweep.json").read_text())
    assert record["completed"] == 1 and record["errors"] == 0, record
    (trial,) = list(csv.DictReader((upstream / "group" / "out" / "trials.csv").read_text().splitlines()))
    assert (trial["status"], trial["reports"], trial["of_reports"]) == ("completed", "2", "2") and float(trial["fid"]) > 0, trial
    (run,) = (upstream / "tune" / "group" / "train").iterdir()
    assert sorted(c.name for c in run.glob("checkpoint_0*")) == ["checkpoint_0000010", "checkpoint_0000020"]  # and Ray Train's own state


# A synchronous PBT sweep through the stage's own Tuner settings, with trials that only report (no training):
# trial 1 fails while trial 0 waits for it at the first perturbation point.
SYNCH_PBT_WITH_A_FAILED_TRIAL = """
import sys, tempfile, time
from pathlib import Path
import mlflow
import ray
from ray import tune
from gen_core.config import load_config
from pipelines.common import StageError
from pipelines.ray_env import start_local_ray
from pipelines.sweep import TRIAL_TAG, _tuner, check_ended

def trial(config):
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")  # a child run per trial, as a real trial's training makes
    trial_id = tune.get_context().get_trial_id()
    mlflow.start_run(experiment_id=config["experiment"], run_name=trial_id, parent_run_id=config["parent"], tags={TRIAL_TAG: trial_id})
    if trial_id.endswith("00001"):
        time.sleep(3)  # after trial 0 has reported and is paused at the perturbation point
        raise RuntimeError("the trial's training failed")
    for step in (10, 20, 30):
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "state.json").write_text("{}")
            tune.report({"fid_classifier": 1.0, "step": step}, checkpoint=tune.Checkpoint.from_directory(directory))

root = sys.argv[1]
cfg = load_config("params.yaml", ["sweep.enabled=true", "sweep.name=synch", "sweep.scheduler=pbt", "sweep.pbt.synch=true",
                                  "sweep.num_trials=2", "sweep.total_steps=30", "sweep.report_every_steps=10",
                                  f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", "tracking.experiment=synch"])
mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
experiment = mlflow.create_experiment("synch")
with mlflow.start_run(experiment_id=experiment, run_name="sweep") as parent:
    pass
start_local_ray(ray, num_cpus=2)
started = time.monotonic()
results = _tuner(cfg, tune.with_resources(lambda config: trial({**config, "experiment": experiment, "parent": parent.info.run_id}), {"CPU": 1}),
                 root, f"{root}/synch", None, 2, False).fit()
ray.shutdown()
try:
    check_ended(cfg, results, time.monotonic() - started, parent.info.run_id)
except StageError as err:
    sys.exit(f"error: {err}")
"""


@pytest.mark.slow
def test_a_synchronous_pbt_sweep_stops_at_a_failed_trial_instead_of_waiting_for_it(tmp_path):
    """Found in a test run: a PBT trial failed and its synchronous sweep then waited for it until the test's timeout."""
    result = run_cli(["python", "-c", SYNCH_PBT_WITH_A_FAILED_TRIAL, str(tmp_path)], REPO, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: sweep synch: trial \S+00001\S* failed: RuntimeError: the trial's training failed; a synchronous PBT "
                        r"sweep stops at its first failed trial \(with sweep.pbt.synch: false the others go on\)", last), last
    # the trials' MLflow runs are closed by how they ended: the failed one FAILED, the one Tune stopped KILLED
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("synch").experiment_id], "tags.tune_trial_id != ''")
    ended = sorted((run.data.tags["tune_trial_id"][-5:], run.info.status, run.data.tags.get("sweep_trial_status")) for run in runs)
    assert ended == [("00000", "KILLED", "stopped"), ("00001", "FAILED", "error")], ended


@pytest.mark.slow
def test_interrupted_sweep_resumes_from_its_storage(upstream):
    directory = upstream / "resume"
    directory.mkdir()
    params = sweep_params(upstream, name="resume", num_trials=2, total_steps=30, max_concurrent_trials=2, scheduler="fifo", out_dir=str(directory / "out"),
                          metrics_file=str(directory / "sweep.json"))  # fmt: skip
    path = write_params(directory, params)
    command = [str(VENV_BIN / "python"), "-m", "pipelines.sweep", "--params", str(path)]
    first = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # interrupt once a trial has reported (its first checkpoint is in storage), like Ctrl-C
    deadline = time.monotonic() + 300
    while not list((upstream / "tune" / "resume" / "train").glob("*/checkpoint_*/meta.json")):
        assert first.poll() is None and time.monotonic() < deadline, "sweep ended before it could be interrupted"
        time.sleep(1)
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=120)
    assert first.returncode != 0 and "interrupted" in output, output[-3000:]

    second = run_cli(command, REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming sweep of 2 gan trials" in second.stdout
    assert re.search(r"resumed from checkpoint at step [1-3]0\b", second.stdout)  # the interrupted trial kept its training
    record = json.loads((directory / "sweep.json").read_text())
    assert record["trials"] == 2 and record["completed"] == 2
    # one child run per trial: a restarted trial continues its own, also one interrupted before its first checkpoint
    _, _, children = sweep_runs(upstream, "resume")
    assert len({child.data.tags["tune_trial_id"] for child in children}) == len(children) == 2
    assert all(child.info.status == "FINISHED" for child in children)
