"""The `genforge` command against a real `mlflow server`: champions flags a champion the gate did not crown,
promote runs the same gate (or records an override, which pins the champion until the next promote), and
generate samples the same grid from an export directory and from the registry. Errors are one line."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import main
from tests.conftest import REPO, VENV_BIN, run_cli
from tests.test_registry_concurrency import _client, _model, _register_args, _training_run

pytestmark = pytest.mark.slow


@pytest.fixture
def genforge(capsys):
    """Run the command in this process -> (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # what the test itself printed before
        with pytest.raises(SystemExit) as ended:
            main(list(args))
        out = capsys.readouterr()
        return ended.value.code, out.out, out.err

    return run


def _register(tmp_path, name: str, model, url: str, tag: str) -> str:
    result = run_cli(["python", "-m", "pipelines.register", *_register_args(tmp_path, name, model, url, tag)], REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_champions_promote_and_override(mlflow_server, tmp_path, genforge):
    client, name = _client(mlflow_server), "cli-gan"
    run = _training_run(client)
    good, bad, better = (_model(tmp_path, seed, fid, run) for seed, fid in ((11, 150.0), (12, 1500.0), (13, 90.0)))
    assert "gate: PROMOTED cli-gan v1" in _register(tmp_path, name, good, mlflow_server, "a")
    card = client.get_model_version(name, "1").description
    assert "**Gate at registration: promoted** (fid 150.00 <= threshold 1000.00" in card and "| fid | 150 | |" in card, card
    assert "gate: REJECTED cli-gan v2: fid 1500.00 > threshold 1000.00" in _register(tmp_path, name, bad, mlflow_server, "b")
    params = [*_register_args(tmp_path, name, good, mlflow_server, "cli"), "--set", "registry.ldm.model_name=cli-ldm"]

    code, out, _ = genforge("champions", *params)
    assert code == 0 and out.splitlines()[0].startswith("gan: cli-gan@champion = v1  fid 150.000") and "WARNING" not in out.split("ldm:")[0]
    assert "ldm: cli-ldm@champion: none (not registered)" in out

    client.set_registered_model_alias(name, "champion", "2")  # by hand, as MLflow's UI lets anyone do
    out = genforge("champions", *params)[1]
    assert "cli-gan@champion = v2" in out and "WARNING not promoted by the gate (gate tag 'rejected'" in out
    assert "WARNING fails today's gate: fid 1500.00 > threshold 1000.00" in out

    code, out, _ = genforge("promote", "2", *params)  # the same gate as register: v2 fails, the alias goes back to v1
    assert code == 1 and out.startswith("gate: REJECTED cli-gan v2: fid 1500.00 > threshold 1000.00"), out
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    code, out, _ = genforge("promote", "2", "--override", "UI review wants the old look", *params)
    assert code == 0 and out.startswith("gate: OVERRIDE cli-gan v2: by override of ") and "past the gate's criteria: fid 1500.00 > threshold" in out
    tags = client.get_model_version(name, "2").tags
    assert tags["gate"] == "override" and tags["gate_override"] == "UI review wants the old look" and tags["gate_override_by"]
    assert "WARNING promoted by override of" in genforge("champions", *params)[1]

    # the override pins: a better registration is told so and leaves the alias where it is
    out = _register(tmp_path, name, better, mlflow_server, "c")
    assert "gate: REJECTED cli-gan v3: v2 holds @champion by override (UI review wants the old look); genforge promote moves it" in out
    assert client.get_model_version_by_alias(name, "champion").version == "2"

    code, out, _ = genforge("promote", "3", *params)  # a promotion through the gate ends the pin
    assert code == 0 and out.startswith("gate: PROMOTED cli-gan v3: fid 90.00 <= threshold") and "champion v2 fails this gate" in out, out
    assert client.get_model_version_by_alias(name, "champion").version == "3"
    assert client.get_model_version(name, "2").tags["gate"] == "override ended"

    assert genforge("promote", "9", *params)[::2] == (2, "error: cli-gan v9: no such version\n")
    assert genforge("promote", "1", "--override", " ", *params)[::2] == (2, "error: --override needs a reason (it is recorded on the version)\n")


def _grid_rows(png: bytes, rows: int, cols: int) -> np.ndarray:
    grid = np.asarray(Image.open(io.BytesIO(png)))
    assert grid.shape == (rows * 32, cols * 32)
    return grid


def test_generate_from_an_export_and_from_the_registry(mlflow_server, tmp_path, genforge):
    from gen_core.generators import load_image_generator
    from gen_core.sampling import image_grid, to_uint8

    client = _client(mlflow_server)
    model = _model(tmp_path, 21, 120.0, _training_run(client))
    assert "gate: PROMOTED cli-generate v1" in _register(tmp_path, "cli-generate", model, mlflow_server, "g")
    params = _register_args(tmp_path, "cli-generate", model, mlflow_server, "cli")
    chosen = ["--class", "Sneaker", "--class", "0,bag", "-n", "3", "--seed", "5"]

    code, out, _ = genforge("generate", str(model[0]), *chosen, "-o", str(tmp_path / "local.png"), *params)
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'local.png'}: 3 rows (Sneaker, T-shirt/top, Bag) x 3 samples, seeds 5..13")
    local = (tmp_path / "local.png").read_bytes()
    generator, _ = load_image_generator(model[0])
    expected = image_grid(to_uint8(generator.sample(torch.tensor([7, 7, 7, 0, 0, 0, 8, 8, 8]), list(range(5, 14)))), rows=3)[..., 0]
    assert np.array_equal(_grid_rows(local, 3, 3), expected)

    # the console script, from the registry: the same pixels
    result = run_cli([str(VENV_BIN / "genforge"), "generate", "models:/cli-generate@champion", *chosen, "-o", str(tmp_path / "registry.png"), *params], REPO)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "registry.png").read_bytes() == local

    def error(*args: str) -> str:
        code, _, err = genforge("generate", *args, *params)
        assert code == 2 and err.count("\n") == 1, err
        return err

    assert error(str(model[0]), "--class", "sneakr").startswith("error: --class sneakr: not a class of this model (0 T-shirt/top, 1 Trouser,")
    assert error(str(model[0]), "--sampler", "ddim") == "error: --sampler, --steps and --guidance apply to ldm models; this is a gan\n"
    assert error(str(tmp_path / "nowhere")) == f"error: {tmp_path / 'nowhere'}: no exported generator (generator.json missing)\n"
    assert error("models:/no-such-model@champion").startswith("error: models:/no-such-model@champion: ")
    assert error(str(model[0]), "-n", "0") == "error: -n 0: needs at least 1 sample per class\n"
    assert not (tmp_path / "grid.png").exists()
