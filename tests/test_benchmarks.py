"""The prepared GPU check must at least parse and dry-run here (no GPU on this machine kind)."""

import subprocess

import pytest

from tests.conftest import REPO, subprocess_env


@pytest.mark.slow
def test_gpu_check_dry_runs_on_cpu(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu_check.sh"), "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=subprocess_env(WORK=str(tmp_path / "work"), PYTHON=str(REPO / ".venv/bin/python")),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "overlay ok" in result.stdout and "dry run ok" in result.stdout
    assert (tmp_path / "work/gpu.yaml").exists() and (tmp_path / "work/pipelines/train_gan.py").exists()
    assert not (REPO / "gpu.yaml").exists()  # the check works in a copy, never in the checkout
