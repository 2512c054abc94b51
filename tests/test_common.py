"""pipelines.common: what every stage records about where its code came from."""

import subprocess

from pipelines.common import git_revision


def test_git_revision_is_dirty_for_changed_code_not_for_what_the_pipeline_writes(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True, text=True)

    (tmp_path / "metrics").mkdir()
    for name in ("train.py", "params.yaml", "dvc.lock", "metrics/eval.json"):
        (tmp_path / name).write_text("1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "first")
    head = git("rev-parse", "HEAD").stdout.strip()

    (tmp_path / "dvc.lock").write_text("2\n")  # what `dvc repro` rewrites as it goes
    (tmp_path / "metrics" / "eval.json").write_text("2\n")
    (tmp_path / "scratch.txt").write_text("untracked\n")
    assert git_revision(tmp_path) == head
    assert git_revision(tmp_path / "metrics") == head  # the paths are the repository's, whatever the directory
    (tmp_path / "params.yaml").write_text("2\n")  # a changed config is a changed tree
    assert git_revision(tmp_path) == f"{head}-dirty"
    git("checkout", "params.yaml")
    (tmp_path / "train.py").write_text("2\n")
    assert git_revision(tmp_path) == f"{head}-dirty"
    assert git_revision(tmp_path / "metrics") == f"{head}-dirty"


def test_the_dvc_md5_of_the_prepared_data_is_read_from_dvc_lock():
    import yaml

    from pipelines.ray_train import dvc_out_md5
    from tests.conftest import REPO

    (out,) = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
    assert dvc_out_md5(out["path"]) == dvc_out_md5(str(REPO / out["path"])) == out["md5"]
    assert dvc_out_md5("data/elsewhere") is None


def test_every_stage_help_lists_the_params_it_depends_on():
    """`--help` names the params.yaml sections of the stage's dvc.yaml entry (one source: dvc.yaml)."""
    import sys

    import yaml

    from pipelines.common import REPO_ROOT, stage_params

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, body in stages.items():
        declared = body.get("do", body).get("params", [])
        assert stage_params(name) == declared and declared, name
    # through the real entry points: the default parser, a per-family one, the sweep's own
    runs = {stage: subprocess.Popen([sys.executable, "-m", f"pipelines.{stage}", "--help"], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
            for stage in ("train_gan", "evaluate", "sweep")}  # fmt: skip
    for stage, process in runs.items():
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        assert f"this stage depends on {', '.join(stage_params(stage))}" in " ".join(out.split()), out


def test_recorded_locations_are_relative_to_the_project_root_inside_it(tmp_path, monkeypatch):
    from pipelines.common import portable

    monkeypatch.chdir(tmp_path)  # the project root: the working directory (dvc repro's), or GENFORGE_ROOT
    assert portable(str(tmp_path / "runs" / "ray" / "genforge-gan-1" / "checkpoint_0000020")) == "runs/ray/genforge-gan-1/checkpoint_0000020"
    assert portable("/elsewhere/runs/x") == "/elsewhere/runs/x" and portable("s3://bucket/runs/x") == "s3://bucket/runs/x"


def test_relative_paths_resolve_against_genforge_root_which_a_submitted_job_must_set(tmp_path):
    """A job from `ray job submit --working-dir` runs in Ray's temporary copy of that dir; its relative outputs
    would go there and be deleted with it. (The real `ray job submit` is tests/test_multinode.py; here only the
    driver's environment that Ray's job supervisor sets.)"""
    import json
    import sys

    from tests.conftest import run_cli, subprocess_env, tiny_params, write_params

    code, root = tmp_path / "copy", tmp_path / "project"
    code.mkdir()
    root.mkdir()
    write_params(code, tiny_params())  # data.out_dir: data/prepared (relative)
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}})}
    prepare = [sys.executable, "-m", "pipelines.prepare", "--params", "params.yaml"]

    refused = run_cli(prepare, code, subprocess_env(**job))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"Ray's temporary copy of the working dir ({code})" in refused.stderr and "set GENFORGE_ROOT" in refused.stderr
    relative = run_cli(prepare, code, subprocess_env(**job, GENFORGE_ROOT="project"))
    assert relative.returncode == 2 and relative.stderr.strip() == "error: GENFORGE_ROOT=project: not an absolute path to a directory " \
        "(it is where relative paths in params resolve)", relative.stderr  # fmt: skip
    assert not (code / "data").exists()

    done = run_cli(prepare, code, subprocess_env(**job, GENFORGE_ROOT=str(root)))  # params.yaml: still the one in the copy
    assert done.returncode == 0, done.stderr
    assert (root / "data" / "prepared" / "manifest.json").is_file() and not (code / "data").exists()
