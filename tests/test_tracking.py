"""Tracking URIs that carry credentials are never persisted, logged or printed; errors stay one line,
with the full traceback under GENFORGE_DEBUG=1."""

from __future__ import annotations

import json

import pytest

from gen_core.config import load_config
from pipelines.sweep import with_absolute_paths, trial_config
from pipelines.tracking import check_reachable, persisted_config, redact
from pipelines.common import StageError
from tests.conftest import REPO, run_cli, subprocess_env, tiny_params, write_params

SECRET_URI = "https://alice:s3cr3t-token@mlflow.example.internal:5000"


@pytest.mark.parametrize(
    ("uri", "redacted"),
    [
        (SECRET_URI, "https://***@mlflow.example.internal:5000"),
        ("http://token@127.0.0.1:5000/", "http://***@127.0.0.1:5000/"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        (None, None),
    ],
)
def test_redact_removes_userinfo_only(uri, redacted):
    assert redact(uri) == redacted


def test_a_sweep_never_puts_credentials_into_trial_configs(monkeypatch):
    """Trial configs are persisted by Tune, into every checkpoint's meta.json, the exports and MLflow."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-after-the-test")  # restored (removed) at teardown
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cfg = load_config(REPO / "params.yaml", [f"tracking.tracking_uri={SECRET_URI}"])
    assert "s3cr3t" in json.dumps(cfg.model_dump(mode="json"))  # the check below is not vacuous
    swept = with_absolute_paths(cfg)
    trial = trial_config(swept, {"lr_d_over_lr_g": 2.0}, "t1")
    for dumped in (swept.model_dump(mode="json"), trial.model_dump(mode="json"), persisted_config(cfg)):
        assert "s3cr3t" not in json.dumps(dumped) and "alice" not in json.dumps(dumped)
    import os

    assert os.environ["MLFLOW_TRACKING_URI"] == SECRET_URI  # where trials on the local Ray read it from


def test_unreachable_server_error_does_not_print_the_password():
    with pytest.raises(StageError) as err:
        check_reachable("http://alice:s3cr3t@127.0.0.1:9", wait_s=2)
    assert "s3cr3t" not in str(err.value) and "http://***@127.0.0.1:9" in str(err.value)


def test_errors_are_one_line_and_the_traceback_is_there_under_genforge_debug(tmp_path):
    """A stage that fails (here: register before evaluate) prints one line; GENFORGE_DEBUG=1 adds the traceback."""
    params = write_params(tmp_path, tiny_params(evaluate={"out_dir": str(tmp_path / "eval")}, outputs={"gan": {"out_dir": str(REPO / "profiles")}}))
    command = ["python", "-m", "pipelines.register", "--params", str(params)]
    quiet = run_cli(command, REPO)
    assert quiet.returncode == 2 and quiet.stderr.strip().splitlines() == [f"error: {REPO / 'profiles'}: no exported generator (generator.json missing)"]
    loud = run_cli(command, REPO, env=subprocess_env(GENFORGE_DEBUG="1"))
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_artifacts_live_next_to_a_sqlite_store_outside_the_repo(tmp_path, monkeypatch):
    """The experiment's artifact location was pinned to the repo's mlartifacts/ whatever store was configured."""
    import mlflow

    from pipelines.tracking import connect

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "elsewhere" / "mlflow.db"
    store.parent.mkdir()
    cfg = load_config(REPO / "params.yaml", [f"tracking.tracking_uri=sqlite:///{store}", "tracking.experiment=away"])
    try:
        connect(cfg)
        with mlflow.start_run() as run:
            mlflow.log_text("hello", "note.txt")
        assert (store.parent / "mlartifacts" / run.info.run_id / "artifacts" / "note.txt").exists()
        other = tmp_path / "chosen"
        connect(load_config(REPO / "params.yaml", [f"tracking.tracking_uri=sqlite:///{store}", "tracking.experiment=chosen",
                                                   f"tracking.artifact_location={other}"]))  # fmt: skip
        assert mlflow.get_experiment_by_name("chosen").artifact_location == other.resolve().as_uri()
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_credentials_in_the_uri_leave_it_for_mlflows_auth_variables(monkeypatch):
    from pipelines.tracking import adopt_credentials

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert adopt_credentials("http://alice:s3%40cret@127.0.0.1:5000/base") == "http://127.0.0.1:5000/base"
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3@cret"
    assert adopt_credentials("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_ray_usage_stats_are_off_unless_the_user_opts_in(monkeypatch):
    """Ray's own decision (usage_lib) under the environment a stage gives the Ray it starts."""
    from ray._common.usage import usage_lib

    from pipelines.ray_env import ray_defaults

    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    assert usage_lib.usage_stats_enabled()  # Ray's default: on (so the check below is not vacuous)
    ray_defaults()
    assert not usage_lib.usage_stats_enabled()
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    ray_defaults()
    assert usage_lib.usage_stats_enabled()  # an explicit opt-in stands


def test_one_local_ddp_worker_trains_in_the_stages_process_unless_only_ray_train_gives_what_is_asked(monkeypatch):
    """The default layout (1 worker, ddp, no cluster) skips Ray Train; a cluster, a worker-group restart, a dashboard,
    two workers, a sharded strategy or ray.in_process: false each keep it."""
    from gen_core.config import load_config
    from pipelines.ray_env import trains_in_process

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert load_config(REPO / "params.yaml").ray.num_workers == 1 and trains_in_process(load_config(REPO / "params.yaml"))
    for change in ("ray.address=127.0.0.1:6379", "ray.max_failures=1", "ray.dashboard=true", "ray.num_workers=2",
                   "ray.strategy=fsdp", "ray.strategy=deepspeed", "ray.in_process=false"):  # fmt: skip
        assert not trains_in_process(load_config(REPO / "params.yaml", [change])), change
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # `ray job submit` sets it for the entry point
    assert not trains_in_process(load_config(REPO / "params.yaml"))


def test_a_sweeps_one_worker_trials_follow_the_stages_rule_for_training_in_process():
    """A one-worker ddp trial trains in its trial's actor (a cluster does not change that: the actor is on it);
    two workers per trial, a sharded strategy or ray.in_process: false put each trial on a Ray Train worker group."""
    from gen_core.config import load_config
    from pipelines.sweep import TRIAL_ACTOR, trains_in_process, trial_resources

    sweep = ["sweep.enabled=true"]
    assert trains_in_process(load_config(REPO / "params.yaml", sweep))
    assert trains_in_process(load_config(REPO / "params.yaml", [*sweep, "ray.address=127.0.0.1:6379"]))
    assert trial_resources(load_config(REPO / "params.yaml", sweep)) == {"CPU": 2}
    for change in ("sweep.workers_per_trial=2", "ray.strategy=fsdp", "ray.in_process=false"):
        cfg = load_config(REPO / "params.yaml", [*sweep, change])
        assert not trains_in_process(cfg) and trial_resources(cfg) == TRIAL_ACTOR, change


# The autoscaler's lines as a local Ray forwarded them to a training stage's driver (Ray 2.x, one node), one status report
AUTOSCALER_LINES = """2026-12-03 23:16:13,703\tINFO autoscaler.py:147 -- The autoscaler took 0.0 seconds to fetch the list of nodes.
2026-12-03 23:16:13,703\tINFO autoscaler.py:408 -- 
======== Autoscaler status: 2026-12-03 23:16:13.703858 ========
Node status
---------------------------------------------------------------
Active:
 1 node_81a25d84c81370c5d2cdc0e8234f13e8f343b3f0ba33eaa814e225eb
Pending:
 (no pending nodes)
Recent failures:
 (no failures)

Resources
---------------------------------------------------------------
Total Usage:
 0.0/2.0 CPU
 0B/16.07GiB memory
 16.83KiB/6.89GiB object_store_memory

From request_resources:
 (none)
Pending Demands:
 (no resource demands)
2026-12-03 23:16:13,704\tINFO autoscaler.py:469 -- The autoscaler took 0.001 seconds to complete the update iteration.""".splitlines()


def test_the_autoscalers_status_report_is_left_out_of_a_runs_log_and_its_news_kept():
    from pipelines.ray_env import AutoscalerNews

    news = "2026-12-03 23:16:20,001\tINFO autoscaler.py:500 -- Adding 1 node(s) of type worker."
    warning = "2026-12-03 23:16:25,002\tWARNING autoscaler.py:600 -- Node worker failed to start"
    keep = AutoscalerNews()
    assert keep(AUTOSCALER_LINES) == [] and keep([news]) == [news]
    # a report split across Ray's batches, the news right after it: each batch filtered with what came before
    keep, cut = AutoscalerNews(), 9
    assert keep(AUTOSCALER_LINES[:cut]) == [] and keep([*AUTOSCALER_LINES[cut:], warning, " its detail"]) == [warning, " its detail"]


def _log_same_dataset(db: str, experiment_id: str, barrier, digest: str, results) -> None:
    import mlflow

    from gen_core.config import load_config
    from pipelines.ray_train import log_dataset

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    cfg = load_config(REPO / "params.yaml")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        barrier.wait()
        try:
            log_dataset(mlflow, cfg, str(REPO / "data"), digest)
            results.put((run.info.run_id, "ok"))
        except Exception as err:  # noqa: BLE001 - reported to the test
            results.put((run.info.run_id, f"{type(err).__name__}: {str(err).splitlines()[0]}"))


def test_runs_logging_the_same_dataset_at_once_all_get_it(tmp_path):
    """A sweep's first trials log the prepared data as their input at the same moment: MLflow's SQL store looks the
    dataset up and then inserts it, so all but one insert can fail on its unique key (a PBT trial errored so, and its
    synchronous sweep then waited forever). Real processes racing on one sqlite store, 4 at once, 4 rounds."""
    import multiprocessing

    import mlflow

    db = tmp_path / "mlflow.db"
    experiment_id = mlflow.MlflowClient(f"sqlite:///{db}").create_experiment("race", artifact_location=str(tmp_path / "artifacts"))
    context = multiprocessing.get_context("fork")
    outcomes = []
    for round_ in range(4):
        barrier, results = context.Barrier(4), context.Queue()
        children = [context.Process(target=_log_same_dataset, args=(str(db), experiment_id, barrier, f"digest{round_}", results)) for _ in range(4)]
        for child in children:
            child.start()
        outcomes += [results.get(timeout=120) for _ in children]
        for child in children:
            child.join(60)
    assert [o for o in outcomes if o[1] != "ok"] == []
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    assert all(len(client.get_run(run_id).inputs.dataset_inputs) == 1 for run_id, _ in outcomes)


LOCAL_RAY_TASK_IMPORTS = """
import ray
from pipelines.ray_env import start_local_ray
start_local_ray(ray, num_cpus=1, dashboard=False)
@ray.remote
def probe():
    import genforge_probe_module
    return genforge_probe_module.VALUE
print(ray.get(probe.remote(), timeout=60))
"""


@pytest.mark.slow
def test_a_local_rays_workers_keep_the_drivers_pythonpath(tmp_path):
    """Found on a GPU machine whose Ray was installed under PYTHONPATH: the stage's runtime env replaced PYTHONPATH with
    the repository alone, so its Ray Train workers could not import ray and the run waited for them forever."""
    (tmp_path / "genforge_probe_module.py").write_text("VALUE = 'imported in the worker'\n")
    result = run_cli(["python", "-c", LOCAL_RAY_TASK_IMPORTS], REPO, env=subprocess_env(PYTHONPATH=str(tmp_path)), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "imported in the worker"
