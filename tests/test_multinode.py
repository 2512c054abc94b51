"""A real two-node Ray cluster on this machine: `ray start --head` plus a second `ray start --address`
with its own CPUs and temp dir. Training workers are placed one per node (each asks for all of a
node's CPUs), token authentication is on, and the same entry point runs through the README's `ray job submit`
line (checkpoints on S3, a real moto_server) and through the Python API (RAY_ADDRESS; checkpoints on a shared path)."""

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import (
    REPO, VENV_BIN, copy_project, other_ray_ports, run_cli, start_ray_head, stop_ray, subprocess_env, tiny_params, upstream_sections, write_params,
)  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multinode")]  # one process: the module set-up is shared


def readme_job_lines() -> dict[str, str]:
    """The commands of the README's "Submitting a job" block, comments dropped, keyed by their first two words."""
    block = (REPO / "README.md").read_text().split("### Submitting a job", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines() if line.strip()]
    return {" ".join(line.split()[:2]): line for line in lines}


README_JOB = readme_job_lines()


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, moto_s3):
    root = tmp_path_factory.mktemp("cluster")
    temp = Path(tempfile.mkdtemp(prefix="gf", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    # Token authentication on, as the README sets it up: RAY_AUTH_MODE=token and the token in ~/.ray/auth_token (the README's
    # line makes one unless there is one; so does any local Ray). The env carries the moto endpoint and credentials to both nodes.
    env = subprocess_env(RAY_AUTH_MODE="token")
    token = run_cli(["bash", "-c", README_JOB["ray get-auth-token"]], root, env)
    assert token.returncode == 0 and token.stdout == "", token.stderr  # the token is a credential: not printed
    port, dashboard = start_ray_head(temp / "ray", env, num_cpus=2)  # temp/ray: where RAY_TMPDIR=temp makes Ray look
    try:
        node = run_cli([str(VENV_BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2",
                        "--temp-dir", str(temp / "node2"), *other_ray_ports(), "--disable-usage-stats"], root, env)  # fmt: skip
        assert node.returncode == 0, node.stderr
        for _ in range(30):  # the second node registers a few seconds after `ray start` returns
            status = run_cli([str(VENV_BIN / "ray"), "status", "--address", f"127.0.0.1:{port}"], root, env)
            if status.stdout.count(" node_") == 2 and "0.0/4.0 CPU" in status.stdout:
                break
            time.sleep(2)
        else:
            pytest.fail(f"second node did not join: {status.stdout}")
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env, "root": root, "temp": temp}
    finally:
        stop_ray(temp, port)
        shutil.rmtree(temp, ignore_errors=True)


def two_node_params(**sections) -> dict:
    """The tiny profile sized for this cluster: a short GAN run, one worker per node."""
    params = tiny_params(**sections)
    params["ray"].update(num_workers=2, cpus_per_worker=2)  # 2 CPUs each on two 2-CPU nodes: one worker per node
    params["gan"].update(total_steps=10, checkpoint_every_steps=5, evaluation={"every_steps": None})  # no classifier here
    return params


@pytest.fixture(scope="module")
def cluster_params(two_node_cluster):
    root = two_node_cluster["root"]
    params = two_node_params(data={"out_dir": str(root / "prepared")})
    params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
    path = write_params(root, params)
    assert run_cli(["python", "-m", "pipelines.prepare", "--params", str(path)], REPO, two_node_cluster["env"]).returncode == 0
    return path


def test_the_readme_job_submit_line_trains_with_deepspeed_across_two_nodes_and_keeps_every_output(two_node_cluster, moto_s3):
    """The README's `ray job submit` line, verbatim, from a project directory (a fresh copy; its params.yaml: DeepSpeed,
    checkpoints on S3). The job runs in Ray's temporary copy of that directory; every output must land under
    GENFORGE_ROOT (the project), where `dvc repro` puts it, and none in the copy. Without GENFORGE_ROOT: refused in one line."""
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="cluster")
    project = copy_project(two_node_cluster["root"] / "project")
    # the default relative paths (data/prepared, models/gan, sqlite:///mlflow.db, ...); DeepSpeed, checkpoints on S3
    write_params(project, two_node_params(ray={"strategy": "deepspeed", "storage_path": "s3://cluster/ray"}))
    env = {**two_node_cluster["env"], "RAY_API_SERVER_ADDRESS": two_node_cluster["dashboard"]}  # the README's export, this cluster's port
    assert run_cli(["python", "-m", "pipelines.prepare"], project, env).returncode == 0  # data/: git-ignored, so never uploaded

    submit = README_JOB["ray job"]
    unrooted = run_cli(["bash", "-c", submit.split(" --runtime-env-json ")[0] + " -- python -m pipelines.train_gan"], project, env)
    assert unrooted.returncode != 0, unrooted.stdout[-2000:]
    assert "error: this job runs in Ray's temporary copy of the working dir" in unrooted.stdout, unrooted.stdout[-2000:]

    uploaded_losses = (project / "metrics/gan_losses.csv").read_bytes()  # committed, so uploaded with the working dir
    submitted = run_cli(["bash", "-c", submit], project, env, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-3000:]
    assert "succeeded" in submitted.stdout.lower()
    assert "2 worker(s) on cpu across 2 nodes" in submitted.stdout and "deepspeed ZeRO-2" in submitted.stdout
    assert "step 10/10" in submitted.stdout
    meta = json.loads((project / "models/gan/generator.json").read_text())
    assert meta["step"] == 10 and meta["checkpoint"].startswith("s3://cluster/ray/")
    # each node uploaded its own ZeRO partition into the one checkpoint directory on S3
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3})
    files = [p.split("/checkpoint_0000010/")[-1] for p in fs.find(meta["checkpoint"].removeprefix("s3://"))]
    for rank in (0, 1):
        assert f"deepspeed/G/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
    assert (project / "metrics/gan_losses.csv").is_file() and (project / "mlflow.db").is_file()
    assert any(p.is_file() for p in project.glob("mlartifacts/*/artifacts/**/*")), "no MLflow artifact next to mlflow.db"
    copies = [p for p in two_node_cluster["temp"].glob("*/session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert copies and all((copy / "pipelines").is_dir() for copy in copies)  # Ray's copies of the project
    assert (project / "metrics/gan_losses.csv").read_bytes() != uploaded_losses  # the job's curve replaced it in the project
    for copy in copies:
        left = [name for name in ("data", "models", "runs", "mlflow.db", "mlartifacts", "logs") if (copy / name).exists()]
        assert not left, f"{copy}: {left}"
        assert (copy / "metrics/gan_losses.csv").read_bytes() == uploaded_losses, copy  # as uploaded: the job wrote elsewhere


@pytest.fixture(scope="module")
def api_run(two_node_cluster, cluster_params):
    """train_gan through the Python API on the cluster (RAY_ADDRESS), FSDP, checkpoints on a shared path."""
    out = two_node_cluster["root"] / "gan-api"
    storage = two_node_cluster["root"] / "shared-ray"
    env = {**two_node_cluster["env"], "RAY_ADDRESS": two_node_cluster["gcs"]}
    result = run_cli(["python", "-m", "pipelines.train_gan", "--params", str(cluster_params), "--set", "ray.strategy=fsdp",
                      "--set", f"ray.storage_path={storage}", "--set", f"outputs.gan.out_dir={out}", "--set", f"outputs.gan.losses_file={out}.csv", "--set", f"outputs.gan.eval_file={out}.eval.csv"],
                     REPO, env)  # fmt: skip
    return result, out, storage


def test_python_api_fsdp_across_two_nodes_with_shared_storage(api_run):
    result, out, storage = api_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 worker(s) on cpu across 2 nodes" in result.stdout and "fsdp (shard block" in result.stdout
    meta = json.loads((out / "generator.json").read_text())
    assert meta["step"] == 10
    shards = sorted(p.name for p in storage.glob("*/checkpoint_0000010/fsdp/*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]


def test_evaluate_on_the_cluster_measures_what_it_measures_in_process(two_node_cluster, api_run, tiny_upstream):
    """On a cluster the evaluate stage samples on Ray workers (one task per worker, one per node here); on one
    machine it samples in its own process. Sample i has seed evaluate.seed + i and class i mod K either way, so
    both give the same metrics (up to float summation order: the batches hold other samples)."""
    root, (trained, generator, _) = two_node_cluster["root"], api_run
    assert trained.returncode == 0, trained.stderr[-2000:]
    params = tiny_params(**upstream_sections(tiny_upstream))  # the session's classifier and reference statistics
    params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"  # where the model's training run is
    params["ray"].update(num_workers=2, cpus_per_worker=2)
    (root / "eval").mkdir()
    path = write_params(root / "eval", params)
    common = ["python", "-m", "pipelines.evaluate", "--family", "gan", "--params", str(path), "--set", f"outputs.gan.out_dir={generator}"]
    here = run_cli([*common, "--set", f"evaluate.out_dir={root}/eval-here"], REPO)
    assert here.returncode == 0, here.stderr[-2000:]
    assert "in this process, 4 threads" in here.stderr + here.stdout
    there = run_cli([*common, "--set", f"evaluate.out_dir={root}/eval-cluster"], REPO, {**two_node_cluster["env"], "RAY_ADDRESS": two_node_cluster["gcs"]})
    assert there.returncode == 0, there.stderr[-2000:]
    assert "on 2 Ray workers" in there.stderr + there.stdout
    local, cluster = (json.loads((root / d / "quick" / "gan.json").read_text()) for d in ("eval-here", "eval-cluster"))
    assert local["num_samples"] == cluster["num_samples"] == 60
    for key in ("fid", "kid", "precision", "recall", "fid_classifier", "class_accuracy", "classifier_score"):
        assert cluster[key] == pytest.approx(local[key], rel=1e-3, abs=1e-4), key


def test_a_stage_without_an_address_starts_its_own_ray_beside_a_running_cluster(two_node_cluster, cluster_params):
    """`ray start` leaves its address where ray.init() looks when given none (RAY_TMPDIR/ray/ray_current_cluster).
    A stage with ray.address and RAY_ADDRESS unset must start a Ray of its own, not join that cluster: joining, Ray
    refused the stage's num_cpus with a ValueError traceback. Its workers' State API calls (Train V2's placement-group
    cleaner makes them; a sweep's own Ray has the dashboard that answers them) must reach its own Ray too: looking for
    "the" Ray on the machine, they died with `Found multiple active Ray instances`, the placement groups of finished
    sweep trials were never released, and the sweep hung."""
    temp = two_node_cluster["temp"]
    assert (temp / "ray" / "ray_current_cluster").read_text().strip().endswith(two_node_cluster["gcs"].split(":")[1])
    code = ("import sys; from gen_core.config import load_config; from pipelines.ray_env import init_ray; "
            "ray = init_ray(load_config(sys.argv[1]), dashboard=True); print('nodes', len(ray.nodes()), 'cpus', ray.cluster_resources()['CPU']); "
            "from ray.util.state import list_nodes; "
            "print('state api from a worker: nodes', ray.get(ray.remote(lambda: len(list_nodes())).remote())); ray.shutdown()")  # fmt: skip
    result = run_cli(["python", "-c", code, str(cluster_params)], REPO, {**two_node_cluster["env"], "RAY_TMPDIR": str(temp)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nodes 1 cpus 4.0" in result.stdout  # its own: one node, sized for the job's 2 x 2 CPUs (the cluster has 2 nodes)
    assert "state api from a worker: nodes 1" in result.stdout
