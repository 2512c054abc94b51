"""`ray job submit` sends the same entry point to a running cluster (a local `ray start --head`)."""

import json
import subprocess

import pytest

from tests.conftest import REPO, VENV_BIN, free_port, run_cli, subprocess_env, tiny_params, write_params

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_cluster(tmp_path):
    port, dashboard = free_port(), free_port()
    env = subprocess_env(RAY_AUTH_MODE="disabled")
    start = run_cli([str(VENV_BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2",
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--disable-usage-stats"],
                    tmp_path, env)  # fmt: skip
    assert start.returncode == 0, start.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_runs_train_gan(tmp_path, ray_cluster):
    address, env = ray_cluster
    params = tiny_params(data={"out_dir": str(tmp_path / "prepared")})
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    params["ray"]["storage_path"] = str(tmp_path / "ray")
    params["gan"].update(total_steps=10, checkpoint_every_steps=5, out_dir=str(tmp_path / "gan"))
    path = write_params(tmp_path, params)
    assert run_cli(["python", "-m", "pipelines.prepare", "--params", str(path)], REPO, env).returncode == 0

    submitted = run_cli([str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                         "python", "-m", "pipelines.train_gan", "--params", str(path)], REPO, env, timeout=600)  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-3000:]
    assert "succeeded" in submitted.stdout.lower()
    assert "step 10/10" in submitted.stdout
    assert json.loads((tmp_path / "gan/generator.json").read_text())["step"] == 10
