"""cluster_configs/ and infra/ cannot be launched here (no cloud, Kubernetes or Docker), so every file is
parsed and checked against the project: each `python -m pipelines.X ...` command they contain (also in
their usage comments) names a real stage and its --set/--overlay arguments validate against
params.yaml; each executable exists; images, versions and DeepSpeed/FSDP configs agree with the code;
services bind to 127.0.0.1 and carry no literal secrets."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from gen_core.config import load_config
from pipelines.strategy import deepspeed_config
from tests.conftest import REPO, VENV_BIN

CONFIGS, INFRA = REPO / "cluster_configs", REPO / "infra"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ghcr.io/genforge/genforge-worker:{VERSION}"
CONFIG_FILES = sorted(p for p in [*CONFIGS.rglob("*"), *INFRA.rglob("*")] if p.is_file() and p.suffix in (".yaml", ".json", ".md", "") or p.name == "Dockerfile")
PIPELINE = re.compile(r"python -m (pipelines\.\w+)((?:[ \t]+(?:--[\w-]+(?:[ =](?!--)[^\s\"'\]]+)?))*)")


def commands(text: str) -> list[tuple[str, list[str]]]:
    """Every `python -m pipelines.X args...`, with shell continuations and comment markers removed."""
    joined = re.sub(r"\\\n\s*#?\s*", " ", text)  # "... \<newline>#   more" -> one line
    joined = re.sub(r"\n\s+(?=--)", " ", joined)  # YAML folded scalars: continuation lines start with --
    return [(module, shlex.split(args)) for module, args in PIPELINE.findall(joined)]


def validate_command(module: str, args: list[str], where: Path) -> None:
    assert (REPO / (module.replace(".", "/") + ".py")).exists(), f"{where}: {module} does not exist"
    assert "def main()" in (REPO / (module.replace(".", "/") + ".py")).read_text(), f"{where}: {module} is not an entry point"
    overrides, overlays, i = [], [], 0
    while i < len(args):
        flag, value = args[i], args[i + 1] if i + 1 < len(args) else None
        assert flag in ("--set", "--overlay", "--params"), f"{where}: {module} has no option {flag}"
        (overrides if flag == "--set" else overlays if flag == "--overlay" else []).append(value)
        if flag != "--set":
            assert (REPO / value).exists(), f"{where}: {value} does not exist"
        i += 2
    cfg = load_config(REPO / "params.yaml", overrides, [REPO / o for o in overlays])  # raises on a bad key or value
    if cfg.ray.strategy == "deepspeed":
        deepspeed_config(REPO / cfg.ray.deepspeed.config, cfg.gan.global_batch_size, cfg.ray.num_workers)


def test_every_file_parses_and_its_pipeline_commands_are_valid():
    seen = 0
    for path in CONFIG_FILES:
        text = path.read_text()
        if path.suffix == ".yaml":
            assert list(yaml.safe_load_all(text)), f"{path}: empty"
        for module, args in commands(text):
            validate_command(module, args, path)
            seen += 1
    assert seen >= 8  # the launcher, KubeRay, compose and overlay usage lines all name stages


def test_command_parser_sees_flags_across_continuations():
    text = "#   ray job submit -- \\\n#       python -m pipelines.train_gan --overlay a.yaml --set ray.strategy=fsdp\n"
    assert commands(text) == [("pipelines.train_gan", ["--overlay", "a.yaml", "--set", "ray.strategy=fsdp"])]
    with pytest.raises(Exception, match="nope"):
        load_config(REPO / "params.yaml", ["ray.nope=1"])


def test_deepspeed_and_fsdp_configs_load():
    stages = {}
    for path in sorted((CONFIGS / "deepspeed").glob("*.json")):
        stages[path.name] = deepspeed_config(path, 64, 2)["zero_optimization"]["stage"]
    assert stages == {"zero1.json": 1, "zero2.json": 2, "zero3.json": 3}
    assert load_config(REPO / "params.yaml").ray.deepspeed.config == "cluster_configs/deepspeed/zero2.json"
    overlays = sorted((CONFIGS / "fsdp").glob("*.yaml"))
    assert len(overlays) == 3
    for path in overlays:
        assert load_config(REPO / "params.yaml", overlays=[path]).ray.strategy == "fsdp"
    cluster = load_config(REPO / "params.yaml", overlays=[CONFIGS / "ray/cluster-params.yaml"])
    assert cluster.ray.use_gpu and cluster.ray.storage_path.startswith("s3://") and cluster.ray.max_failures > 0


@pytest.mark.parametrize("name,provider", [("aws-gpu.yaml", "aws"), ("gcp-gpu.yaml", "gcp")])
def test_ray_cluster_launcher_yaml(name, provider):
    config = yaml.safe_load((CONFIGS / "ray" / name).read_text())
    assert config["provider"]["type"] == provider and config["docker"]["image"] == IMAGE
    assert config["head_node_type"] in config["available_node_types"]
    workers = [n for k, n in config["available_node_types"].items() if k != config["head_node_type"]]
    assert workers and all(n["resources"].get("GPU", 0) > 0 for n in workers)
    assert sum(n["max_workers"] for n in workers) <= config["max_workers"]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert command.split()[0] == "ray" and command.split()[1] in ("start", "stop")
    assert any("--head" in c for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_kuberay_manifests():
    ray_version = importlib.metadata.version("ray")
    cluster = yaml.safe_load((CONFIGS / "kuberay/raycluster.yaml").read_text())
    job = yaml.safe_load((CONFIGS / "kuberay/rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"], job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayCluster", "ray.io/v1", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray_version
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
        assert {c["image"] for c in containers} == {IMAGE}
        assert all(c["resources"]["limits"]["nvidia.com/gpu"] for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
        assert all(isinstance(v, str) for g in groups for v in g["rayStartParams"].values())  # KubeRay wants strings
        volumes = {v["name"] for g in groups for v in g["template"]["spec"].get("volumes", [])}
        mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
        assert mounts <= volumes
    (entry,) = commands(job["spec"]["entrypoint"])
    assert entry[0] == "pipelines.train_gan"
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == "/app"


def test_compose_team_setup():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "ray-head"} <= set(services)
    assert "--backend-store-uri postgresql://" in services["mlflow"]["command"]
    assert "--artifacts-destination s3://" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["ray-head"]["command"].split()[:3] == ["ray", "start", "--head"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is published beyond localhost"
        for key, value in (service.get("environment") or {}).items():
            if re.search("PASSWORD|SECRET", key):
                assert str(value).startswith("${"), f"{name}: {key} is a literal secret"
        if "image" in service and service["image"].startswith("ghcr.io/genforge"):
            assert service["image"] == IMAGE and service["build"]["dockerfile"] == "infra/Dockerfile"
    for executable in ("mlflow", "ray"):
        assert (VENV_BIN / executable).exists()
    assert ".env" in (REPO / ".gitignore").read_text()
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert example["POSTGRES_PASSWORD"] == "" and example["MINIO_ROOT_PASSWORD"] == ""


def test_worker_image_definition():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (install,) = re.findall(r"pip install -c constraints.txt -e '\.\[([\w,]+)\]'", text)
    assert set(install.split(",")) <= set(extras) and "deepspeed" in install
    for source in re.findall(r"^COPY (\S+) ", text, re.M):
        assert source == "." or (REPO / source).exists(), f"COPY {source}: missing"
    assert IMAGE in text


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_launcher_keeps_the_unauthenticated_job_api_on_localhost(name):
    """Ray's job API runs whatever it is sent: the head binds its dashboard to 127.0.0.1 (SSH tunnel)."""
    config = yaml.safe_load((CONFIGS / "ray" / name).read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "ray dashboard" in (CONFIGS / "ray" / name).read_text()
