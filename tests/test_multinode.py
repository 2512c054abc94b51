"""A real two-node Ray cluster on this machine: `ray start --head` plus a second `ray start --address`
with its own CPUs and temp dir. Training workers are placed one per node (each asks for all of a
node's CPUs), and the same entry point runs through `ray job submit` (checkpoints on S3, a real
moto_server) and through the Python API (RAY_ADDRESS; checkpoints on a shared path)."""

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, VENV_BIN, other_ray_ports, run_cli, start_ray_head, stop_ray, subprocess_env, tiny_params, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, moto_s3):
    root = tmp_path_factory.mktemp("cluster")
    temp = Path(tempfile.mkdtemp(prefix="gf", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    env = subprocess_env(RAY_AUTH_MODE="disabled")  # carries the moto endpoint and credentials to both nodes
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


@pytest.fixture(scope="module")
def cluster_params(two_node_cluster):
    root = two_node_cluster["root"]
    params = tiny_params(data={"out_dir": str(root / "prepared")})
    params["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
    params["ray"].update(num_workers=2, cpus_per_worker=2)  # 2 CPUs each on two 2-CPU nodes: one worker per node
    params["gan"].update(total_steps=10, checkpoint_every_steps=5, evaluation={"every_steps": None})  # no classifier here
    path = write_params(root, params)
    assert run_cli(["python", "-m", "pipelines.prepare", "--params", str(path)], REPO, two_node_cluster["env"]).returncode == 0
    return path


def test_job_submit_deepspeed_across_two_nodes_with_s3_checkpoints(two_node_cluster, cluster_params, moto_s3):
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket="cluster")
    out = two_node_cluster["root"] / "gan-submit"
    submitted = run_cli([str(VENV_BIN / "ray"), "job", "submit", "--address", two_node_cluster["dashboard"], "--working-dir", str(REPO), "--",
                         "python", "-m", "pipelines.train_gan", "--params", str(cluster_params), "--set", "ray.strategy=deepspeed",
                         "--set", "ray.storage_path=s3://cluster/ray", "--set", f"outputs.gan.out_dir={out}",
                         "--set", f"outputs.gan.losses_file={out}.csv", "--set", f"outputs.gan.eval_file={out}.eval.csv"], REPO, two_node_cluster["env"], timeout=600)  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-3000:]
    assert "succeeded" in submitted.stdout.lower()
    assert "2 worker(s) on cpu across 2 nodes" in submitted.stdout and "deepspeed ZeRO-2" in submitted.stdout
    assert "step 10/10" in submitted.stdout
    meta = json.loads((out / "generator.json").read_text())
    assert meta["step"] == 10 and meta["checkpoint"].startswith("s3://cluster/ray/")
    # each node uploaded its own ZeRO partition into the one checkpoint directory on S3
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3})
    files = [p.split("/checkpoint_0000010/")[-1] for p in fs.find(meta["checkpoint"].removeprefix("s3://"))]
    for rank in (0, 1):
        assert f"deepspeed/G/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files


def test_python_api_fsdp_across_two_nodes_with_shared_storage(two_node_cluster, cluster_params):
    out = two_node_cluster["root"] / "gan-api"
    storage = two_node_cluster["root"] / "shared-ray"
    env = {**two_node_cluster["env"], "RAY_ADDRESS": two_node_cluster["gcs"]}
    result = run_cli(["python", "-m", "pipelines.train_gan", "--params", str(cluster_params), "--set", "ray.strategy=fsdp",
                      "--set", f"ray.storage_path={storage}", "--set", f"outputs.gan.out_dir={out}", "--set", f"outputs.gan.losses_file={out}.csv", "--set", f"outputs.gan.eval_file={out}.eval.csv"],
                     REPO, env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 worker(s) on cpu across 2 nodes" in result.stdout and "fsdp (shard block" in result.stdout
    meta = json.loads((out / "generator.json").read_text())
    assert meta["step"] == 10
    shards = sorted(p.name for p in storage.glob("*/checkpoint_0000010/fsdp/*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]


def test_a_stage_without_an_address_starts_its_own_ray_beside_a_running_cluster(two_node_cluster, cluster_params):
    """`ray start` leaves its address where ray.init() looks when given none (RAY_TMPDIR/ray/ray_current_cluster).
    A stage with ray.address and RAY_ADDRESS unset must start a Ray of its own, not join that cluster: joining, Ray
    refused the stage's num_cpus with a ValueError traceback."""
    temp = two_node_cluster["temp"]
    assert (temp / "ray" / "ray_current_cluster").read_text().strip().endswith(two_node_cluster["gcs"].split(":")[1])
    code = ("import sys; from gen_core.config import load_config; from pipelines.ray_env import init_ray; "
            "ray = init_ray(load_config(sys.argv[1])); print('nodes', len(ray.nodes()), 'cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
    result = run_cli(["python", "-c", code, str(cluster_params)], REPO, {**two_node_cluster["env"], "RAY_TMPDIR": str(temp)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nodes 1 cpus 4.0" in result.stdout  # its own: one node, sized for the job's 2 x 2 CPUs (the cluster has 2 nodes)
