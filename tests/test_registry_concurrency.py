"""The gate under concurrency: `register` processes racing each other against a real `mlflow server`
(2 workers, sqlite). Every repetition must end with exactly one champion, the right one, no duplicate
versions, no traceback, and the training runs' status untouched. Also: a server killed mid-register
gives a bounded wait and one line, and a rerun repairs what was left."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, VENV_BIN, free_port, subprocess_env, tiny_params, write_params, _wait_http

pytestmark = pytest.mark.slow
REPETITIONS = 5
PROTOCOL_ID = "quick:1000-vs-eval1000:inception-fp32:clean"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _training_run(client) -> str:
    experiment = client.get_experiment_by_name("genforge")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("genforge")
    run = client.create_run(experiment_id, run_name="race-training")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _model(root: Path, seed: int, fid: float, run_id: str) -> tuple[Path, Path]:
    """An exported tiny GAN generator (weights from `seed`) and the evaluate record saying `fid`."""
    from gen_core.checkpoint import export_generator
    from gen_core.config import load_config
    from gen_core.models import build_generator, gan_specs

    cfg = load_config(write_params(root, tiny_params()))
    spec, _ = gan_specs(cfg.gan.model, cfg.data.resolution, cfg.data.channels, 10)
    torch.manual_seed(seed)
    generator_dir, eval_dir = root / f"gen-{seed}", root / f"eval-{seed}"
    meta = {"family": "gan", "generator_spec": spec.__dict__, "step": 7, "mlflow_run_id": run_id, "data_hash": "d", "git_revision": "r",
            "class_names": list(CLASS_NAMES)}  # fmt: skip
    export_generator(generator_dir, build_generator(spec).state_dict(), meta)
    record = {
        "step": 7, "family": "gan", "protocol": "quick", "protocol_id": PROTOCOL_ID, "fid": fid, "kid": 0.1, "fid_classifier": 5.0,
        "class_accuracy": 0.9, "precision": 0.5, "recall": 0.5, "classifier_score": 5.0, "diversity": 0.9, "classes_covered": 10,
        "feature_sha256": "f",
    }  # fmt: skip
    (eval_dir / "quick").mkdir(parents=True)
    (eval_dir / "quick" / "gan.json").write_text(json.dumps(record))
    return generator_dir, eval_dir


def _register_args(root: Path, name: str, model: tuple[Path, Path], url: str, tag: str, wait_s: float = 20) -> list[str]:
    generator_dir, eval_dir = model
    params = tiny_params(
        outputs={"gan": {"out_dir": str(generator_dir)}}, evaluate={"out_dir": str(eval_dir)},
        registry={"out_dir": str(root / f"register-{tag}"), "gan": {"model_name": name, "fid_threshold": 1000.0}},
        tracking={"tracking_uri": url, "server_wait_s": wait_s},
    )  # fmt: skip
    directory = root / f"params-{tag}"
    directory.mkdir()
    return ["--params", str(write_params(directory, params))]


def _race(races: list[list[list[str]]], out: Path) -> list[list[dict]]:
    """Run the races (tests/registry_race.py) -> per race, per process: rc, stdout, stderr."""
    out.mkdir()
    spec = out / "races.json"
    spec.write_text(json.dumps(races))
    subprocess.run([sys.executable, str(REPO / "tests" / "registry_race.py"), str(spec), str(out)], cwd=REPO, env=subprocess_env(),
                   check=True, timeout=900)  # fmt: skip
    return [
        [{"rc": int((out / f"{n}-{i}.rc").read_text()), "out": (out / f"{n}-{i}.out").read_text(), "err": (out / f"{n}-{i}.err").read_text()}
         for i in range(len(race))]
        for n, race in enumerate(races)
    ]  # fmt: skip


def _check(client, name: str, results: list[dict], runs: list[str], expected_sha: str, generators: int) -> None:
    for result in results:
        assert result["rc"] == 0 and "Traceback" not in result["err"] and "Traceback" not in result["out"], result
    versions = client.search_model_versions(f"name='{name}'")
    shas = [v.tags.get("generator_sha256") for v in versions]
    assert len(shas) == len(set(shas)) == generators, f"{name}: versions {[(v.version, v.tags.get('generator_sha256')) for v in versions]}"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["generator_sha256"] == expected_sha, f"{name}: wrong champion v{champion.version} (fid {champion.tags['fid']})"
    # PROMOTED is printed by the champion, and by no version that a better one existing at its creation beat: only a
    # version created later (a higher number) may have displaced it (a better version made first but tagged late once did)
    promoted = {int(line.split()[3][1:]) for r in results for line in r["out"].splitlines() if line.startswith("gate: PROMOTED")}
    crowned = int(champion.version)
    assert crowned in promoted and max(promoted) == crowned, f"{name}: PROMOTED printed for {promoted}, champion v{crowned}"
    for run_id in runs:
        assert client.get_run(run_id).info.status == "FINISHED"


def test_concurrent_registrations_end_with_the_right_champion_and_no_duplicates(mlflow_server, tmp_path):
    """5 x two different versions (FID 312.9 vs 254.3) racing for a new model name (so also its first
    registration), 5 x the same generator registered twice at once, 5 x two versions racing against an
    existing champion (FID 300) that only one of them beats."""
    from gen_core.generators import generator_digest

    client = _client(mlflow_server)
    runs = [_training_run(client) for _ in range(3)]
    worse, better, same, incumbent = (_model(tmp_path, seed, fid, run) for seed, fid, run in
                                      ((1, 312.9, runs[0]), (2, 254.3, runs[1]), (3, 100.0, runs[2]), (4, 300.0, runs[2])))  # fmt: skip
    races, checks = [], []
    for rep in range(REPETITIONS):
        name = f"race-two-{rep}"
        races.append([_register_args(tmp_path, name, worse, mlflow_server, f"two{rep}a"), _register_args(tmp_path, name, better, mlflow_server, f"two{rep}b")])
        checks.append((name, generator_digest(better[0]), 2))
    for rep in range(REPETITIONS):
        name = f"race-same-{rep}"
        races.append([_register_args(tmp_path, name, same, mlflow_server, f"same{rep}{i}") for i in "ab"])
        checks.append((name, generator_digest(same[0]), 1))
    seeded = []
    for rep in range(REPETITIONS):
        name = f"race-incumbent-{rep}"
        seeded.append([_register_args(tmp_path, name, incumbent, mlflow_server, f"inc{rep}")])
        races.append([_register_args(tmp_path, name, worse, mlflow_server, f"inc{rep}a"), _register_args(tmp_path, name, better, mlflow_server, f"inc{rep}b")])
        checks.append((name, generator_digest(better[0]), 3))
    for result in _race(seeded, tmp_path / "seed"):
        assert result[0]["rc"] == 0 and "PROMOTED" in result[0]["out"], result

    started = time.monotonic()
    outcomes = _race(races, tmp_path / "races")
    print(f"{len(races)} races in {time.monotonic() - started:.0f} s")
    for (name, expected, generators), results in zip(checks, outcomes):
        _check(client, name, results, runs, expected, generators)


@pytest.fixture
def own_mlflow_server(tmp_path):
    """An mlflow server this test may kill and restart (same port, same store)."""
    root, port = tmp_path / "server", free_port()
    root.mkdir()

    def start() -> subprocess.Popen:
        process = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
            stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True,
        )  # fmt: skip
        _wait_http(f"http://127.0.0.1:{port}/health", 90, process)
        return process

    def kill(process: subprocess.Popen) -> None:  # the server and its workers (a process group of their own)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(15)

    processes = [start()]
    yield f"http://127.0.0.1:{port}", processes, start, kill
    for process in processes:
        kill(process)


def test_a_server_killed_mid_register_is_one_line_after_a_bounded_wait_and_a_rerun_repairs(own_mlflow_server, tmp_path):
    url, processes, start, kill = own_mlflow_server
    client = _client(url)
    run_id = _training_run(client)
    args = ["python", "-m", "pipelines.register", *_register_args(tmp_path, "outage", _model(tmp_path, 5, 80.0, run_id), url, "a", wait_s=8)]
    register = subprocess.Popen(args, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in register.stdout:  # kill the server as soon as the version is being logged
        if line.startswith("registering "):
            kill(processes[0])
            killed = time.monotonic()
            break
    else:
        pytest.fail(f"register never started logging: {register.stderr.read()}")
    stdout, stderr = register.communicate(timeout=180)
    waited = time.monotonic() - killed
    print(f"register ended {waited:.1f} s after the server was killed")
    assert register.returncode == 2, stdout + stderr
    assert stderr.strip().splitlines() == [stderr.strip()] and stderr.startswith(f"error: MLflow tracking server {url}: stopped answering while registering")
    assert waited < 60, f"waited {waited:.0f} s with server_wait_s=8"

    processes.append(start())  # the server is back: a rerun finishes the registration, nothing duplicated
    again = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "gate: PROMOTED outage v" in again.stdout, again.stdout + again.stderr
    assert len(client.search_model_versions("name='outage'")) == 1
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_tracking_uri_with_credentials_works_and_the_secret_goes_nowhere(mlflow_server, tmp_path):
    """The reachability check passed `user:password@host` to the resolver, so such a URI could never work;
    MLflow itself prints and stores the URI it is given."""
    client = _client(mlflow_server)
    run_id = _training_run(client)
    secret_uri = mlflow_server.replace("http://", "http://alice:s3cr3t-token@")
    args = _register_args(tmp_path, "with-credentials", _model(tmp_path, 6, 90.0, run_id), secret_uri, "cred")
    result = subprocess.run(["python", "-m", "pipelines.register", *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "gate: PROMOTED with-credentials v1" in result.stdout, result.stdout + result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr
    assert all("s3cr3t" not in p.read_text() for p in (tmp_path / "register-cred").rglob("*.json"))
    version = client.get_model_version("with-credentials", "1")
    assert "s3cr3t" not in json.dumps(version.tags) + str(version.source)
    unreachable = secret_uri.rsplit(":", 1)[0] + ":9"
    down = subprocess.run(["python", "-m", "pipelines.register", *args[:1], args[1], "--set", f"tracking.tracking_uri={unreachable}",
                           "--set", "tracking.server_wait_s=2"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert down.returncode == 2 and "s3cr3t" not in down.stdout + down.stderr
    assert down.stderr.strip().splitlines() == ["error: MLflow tracking server http://127.0.0.1:9: unreachable for 2 s (Connection refused)"]


def test_simultaneous_first_writes_of_a_tag_all_succeed(mlflow_server):
    """MLflow's SQL store writes a tag by reading, then inserting: of two first writes of one tag at once, one
    fails on the unique key. The race test met it (two registrations of one generator tag the same version); here
    4 threads write each of 20 new tags at once (unguarded, 2 to 5 of the 20 rounds failed here)."""
    import threading

    from mlflow.exceptions import MlflowException

    from pipelines.registry import _write

    client = _client(mlflow_server)
    name = "tag-race"
    client.create_registered_model(name)
    run_id = _training_run(client)
    version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id).version
    errors = []
    for key in range(20):
        barrier = threading.Barrier(4)

        def write(value: int, key: str = f"k{key}") -> None:
            writer = _client(mlflow_server)
            barrier.wait()
            try:
                _write(writer.set_model_version_tag, name, version, key, str(value))
            except MlflowException as err:
                errors.append(str(err).splitlines()[0])

        threads = [threading.Thread(target=write, args=(value,)) for value in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    tags = client.get_model_version(name, version).tags
    assert all(tags[f"k{key}"] in {"0", "1", "2", "3"} for key in range(20))
