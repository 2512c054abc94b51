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
        check_reachable("http://alice:s3cr3t@127.0.0.1:9", timeout_s=2)
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
