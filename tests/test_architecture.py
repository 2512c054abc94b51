"""The shape of the code, checked: stages are leaves, DVC code deps match the imports, one source of defaults.

Imports are read from the source (every `import` anywhere in a module, lazy ones included), so these
checks run in milliseconds and need nothing installed beyond PyYAML.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from gen_core.config import RunConfig, load_config
from pipelines.common import PIPELINE_FILES
from tests.conftest import REPO

PACKAGES = ("gen_core", "pipelines")
PIPELINES = {name: yaml.safe_load((REPO / name).read_text()) for name in PIPELINE_FILES}
# Files a module uses by path rather than by import: MLflow loads the registered model's code file; the sweep
# runs the evaluate and register stages on its best trial as processes of their own.
RUNTIME_FILES = {"pipelines/registry.py": ("pipelines/mlflow_model.py",),
                 "pipelines/sweep.py": ("pipelines/evaluate.py", "pipelines/register.py")}  # fmt: skip
# The one sanctioned stage-to-stage use: the sweep trains trials through each family's job factory.
SWEEP_TRAINS = {("pipelines/sweep.py", "pipelines/train_gan.py"), ("pipelines/sweep.py", "pipelines/train_ldm.py")}


def imported_files(path: Path) -> set[str]:
    """Repo files (gen_core/*.py, pipelines/*.py) that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            candidate = REPO / (name.replace(".", "/") + ".py")
            if name.split(".")[0] in PACKAGES and candidate.exists() and candidate.name != "__init__.py":
                found.add(candidate.relative_to(REPO).as_posix())
    return found


def closure(start: str) -> set[str]:
    """`start` and every repo file it reaches through imports (and RUNTIME_FILES)."""
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += sorted(imported_files(REPO / current)) + list(RUNTIME_FILES.get(current, ()))
    return seen


def qualified(pipeline: str, stage: str) -> str:
    """A stage's name as DVC addresses it from the repo root: `stage` in dvc.yaml, `path/dvc.yaml:stage` elsewhere."""
    return stage if pipeline == "dvc.yaml" else f"{pipeline}:{stage}"


def stage_entries() -> dict[str, dict]:
    """Every stage of every pipeline file, by its qualified name -> its dvc.yaml entry."""
    return {qualified(pipeline, name): entry for pipeline, parsed in PIPELINES.items() for name, entry in parsed["stages"].items()}


def stage_modules() -> dict[str, str]:
    """qualified dvc stage name -> the module file its cmd runs (`python -m pipelines.X`)."""
    out = {}
    for name, stage in stage_entries().items():
        cmd = (stage.get("do") or stage)["cmd"]
        module = cmd.split("python -m ")[1].split()[0]
        out[name] = module.replace(".", "/") + ".py"
    return out


STAGE_FILES = set(stage_modules().values())


def test_stage_modules_are_leaves():
    """A stage module imports shared code only (gen_core, neutral pipelines modules), never another stage;
    nothing but tests imports a stage (and the sweep, each family's training job factory)."""
    offenders = []
    for path in sorted((REPO / "pipelines").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py")):
        source = path.relative_to(REPO).as_posix()
        for target in imported_files(path) & STAGE_FILES:
            if target != source and (source, target) not in SWEEP_TRAINS:
                offenders.append(f"{source} imports stage {target}")
    assert not offenders, "; ".join(offenders)


def test_benchmarks_do_not_import_tests():
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in modules if m.split(".")[0] == "tests"], f"{path.name} imports from tests"


def test_the_leaf_check_sees_a_stage_import(tmp_path):
    """The check above is not vacuous: a stage importing a stage is seen, lazy imports included."""
    module = tmp_path / "x.py"
    module.write_text("def f():\n    from pipelines.train_gan import training_job\n    from gen_core.latents import load_latents\n")
    assert imported_files(module) == {"pipelines/train_gan.py", "gen_core/latents.py"}


def test_the_prepare_stage_and_the_shared_stage_code_start_without_torch():
    """`prepare` (run ~20 times by the suite, once per `dvc repro`) and what every stage imports first need no
    network, so they do not pay torch's 2-s import: pipelines.common names the checkpoint and feature-net errors
    from gen_core.errors, not from the torch modules that raise them."""
    import subprocess
    import sys

    probe = "import sys, pipelines.prepare, pipelines.common; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("stage", sorted(stage_modules()))
def test_dvc_code_deps_are_exactly_what_the_stage_imports(stage):
    """Each stage's code deps in dvc.yaml are its module's transitive in-repo imports: none missing (a
    change there would leave the stage's outputs stale while `dvc status` says up to date), none extra."""
    entry = stage_entries()[stage]
    deps = (entry.get("do") or entry)["deps"]
    declared = {d for d in deps if d.endswith(".py") and d.split("/")[0] in PACKAGES}
    needed = closure(stage_modules()[stage])
    missing, extra = sorted(needed - declared), sorted(declared - needed)
    assert not missing and not extra, f"dvc.yaml {stage}: missing {missing}, not used {extra}"


@pytest.mark.parametrize("pipeline", PIPELINE_FILES)
def test_the_committed_dvc_lock_ran_this_code(pipeline):
    """dvc.lock (with metrics/) records what the last `make repro` ran: each of its code deps must have the md5 of the
    file at HEAD, and its stages must be dvc.yaml's. After changing code a stage runs, run `make repro` and
    commit dvc.lock and metrics/ (README, "Reproducible records"). Directory deps (cluster_configs/deepspeed) are not hashed here.
    conditional/dvc.lock is checked where it exists; it is not committed (its outputs are in no clone's cache, which fails `dvc exp run`)."""
    import hashlib

    lock_file = REPO / pipeline.replace("dvc.yaml", "dvc.lock")
    if pipeline != "dvc.yaml" and not lock_file.exists():
        pytest.skip(f"{lock_file.relative_to(REPO)} is not committed")
    stages = PIPELINES[pipeline]["stages"]
    lock = yaml.safe_load(lock_file.read_text())["stages"]
    declared = {f"{name}@{key}" for name, stage in stages.items() for key in (stage.get("foreach") or {})}
    declared |= {name for name, stage in stages.items() if "foreach" not in stage}
    stale = sorted([f"{stage}: not in dvc.lock" for stage in declared - set(lock)] + [f"{stage}: no such stage" for stage in set(lock) - declared])
    for stage, entry in lock.items():
        for dep in entry.get("deps", []):
            path = (lock_file.parent / stages.get(stage.split("@")[0], {}).get("wdir", ".") / dep["path"]).resolve()  # lock paths: from the stage's wdir
            if path.suffix == ".py" and (not path.is_file() or hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]):
                stale.append(f"{stage}: {dep['path']}")
    assert not stale, "dvc.lock is older than the code (run `make repro`, commit dvc.lock and metrics/): " + ", ".join(stale)


def test_defaults_in_code_equal_params_yaml():
    """One source of defaults: a line deleted from params.yaml must not change the run."""
    from_params = load_config(REPO / "params.yaml").model_dump(mode="json")
    defaults = RunConfig().model_dump(mode="json")
    drift = [f"{section}: {key}" for section in defaults for key in _diff(defaults[section], from_params[section])]
    assert not drift, "code defaults differ from params.yaml at " + ", ".join(drift)


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [f"{prefix.rstrip('.')} (code {a!r}, params.yaml {b!r})"]


def test_the_drift_check_sees_a_changed_default():
    changed = RunConfig().model_copy(update={"gan": RunConfig().gan.model_copy(update={"lr_d": 1e-3})})
    assert _diff(changed.model_dump(mode="json")["gan"], RunConfig().model_dump(mode="json")["gan"]) == [
        "lr_d (code 0.001, params.yaml 0.0004)"
    ]


def test_functions_and_classes_stay_short():
    """No function in pipelines/ over 60 lines and no class over 120: one job each, readable whole."""
    long = []
    for path in sorted((REPO / "pipelines").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = f"{path.relative_to(REPO).as_posix()}:{getattr(node, 'name', '')}"
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                long.append(f"{name} ({size} lines)")
            if isinstance(node, ast.ClassDef) and size > 120:
                long.append(f"{name} ({size} lines)")
    assert not long, ", ".join(long)
