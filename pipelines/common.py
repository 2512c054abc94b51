"""Shared plumbing for stage entry points: arguments, typed config, one-line errors, provenance.

Expected failures (bad config, bad data, a missing upstream output, an unreachable server or S3
endpoint, a file-system error on a named path, a failed training run) end as one line on stderr and exit code 2. The full traceback, including what Ray
wrapped, is printed before that line when GENFORGE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, get_args

from gen_core.config import ConfigError, Family, RunConfig, load_config
from gen_core.data import DataError
from gen_core.errors import CheckpointError, FeatureNetError

REPO_ROOT = Path(__file__).resolve().parent.parent


class StageError(RuntimeError):
    """A stage cannot go on (unreachable server, missing upstream output...). One-line message."""


# The DVC pipelines: the default one (`dvc repro`), and the conditional families' (`dvc repro conditional/dvc.yaml`)
PIPELINE_FILES = ("dvc.yaml", "conditional/dvc.yaml")
EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, FeatureNetError, StageError)


def stage_parser(description: str, add_help: bool = True, stage: str | None = None) -> argparse.ArgumentParser:
    """The arguments every stage takes; `stage` (its name in dvc.yaml) adds the params sections it depends on to --help."""
    parser = argparse.ArgumentParser(description=description, add_help=add_help, epilog=params_epilog(stage) if stage else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--overlay", dest="overlays", action="append", default=[], metavar="FILE",
        help="YAML merged over the params file, e.g. a sweep's best_params.yaml (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a param, e.g. --set gan.total_steps=100 (repeatable; values are YAML)",
    )  # fmt: skip
    return parser


def family_parser(description: str, stage: str) -> argparse.ArgumentParser:
    """The parser of the stages that run once per model family (evaluate, register)."""
    parser = stage_parser(description, stage=stage)
    parser.add_argument("--family", choices=list(get_args(Family)), default="gan", help="model family (default: gan)")
    return parser


def stage_params(stage: str) -> list[str]:
    """The params.yaml sections (or keys) the stage depends on, as dvc.yaml declares them (DVC reruns it when they change)."""
    import yaml

    for pipeline in PIPELINE_FILES:
        try:
            body = yaml.safe_load((REPO_ROOT / pipeline).read_text())["stages"][stage]
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            continue
        return [str(p) for p in body.get("do", body).get("params", [])]
    return []


def params_epilog(stage: str) -> str | None:
    sections = stage_params(stage)
    if not sections:
        return None
    import textwrap

    return textwrap.fill(f"params.yaml: this stage depends on {', '.join(sections)} (dvc.yaml reruns it when they change), "
                         "and reads the locations of its inputs and outputs (data.out_dir, outputs.*, ...).", 100)  # fmt: skip


def error_line(err: BaseException) -> str:
    """The one line that says what went wrong. Ray wraps a worker's or a trial's failure in an error
    whose text is the remote traceback; its last line naming an error is the root cause (ours are one
    line already, e.g. `FloatingPointError: non-finite loss at step 40: ...`)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else type(err).__name__


def unreachable_storage(err: BaseException) -> str | None:
    """One line for an S3 endpoint that cannot be reached (botocore's connection errors, found anywhere
    in the exception's chain, e.g. under s3fs or pyarrow), or None for any other error."""
    try:
        from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError
    except ImportError:
        return None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS"
            return f"S3 endpoint {endpoint} unreachable: {str(err).splitlines()[0]} (check AWS_ENDPOINT_URL and the network)"
        err = err.__cause__ or err.__context__
    return None


def file_error(err: BaseException) -> str | None:
    """One line for a file-system error about a named path (an output directory under a file, no
    permission, a full disk), or None."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or type(err).__name__}"
    return None


def debugging() -> bool:
    return os.environ.get("GENFORGE_DEBUG", "") not in ("", "0")


def run_stage(
    name: str, body: Callable[[RunConfig, argparse.Namespace], int | None], parser: argparse.ArgumentParser | None = None,
    report_time: bool = True,
) -> None:
    """Parse args, load the typed config, run `body`, and turn expected failures into one line + exit 2.
    `report_time`: end with a "done in" log line (stages; not the `genforge` command, whose output may be JSON)."""
    parser = parser or stage_parser(f"genforge {name} stage", stage=name)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a registered model's download is a few files: no bars
    started = time.monotonic()
    try:
        started_in = enter_project_root()
        params = [os.path.join(started_in, p) for p in (args.params, *args.overlays)]  # named from where the command ran
        cfg = load_config(params[0], args.overrides, params[1:])
        code = body(cfg, args) or 0
    except Exception as err:
        line = str(err) if isinstance(err, EXPECTED_ERRORS) else unreachable_storage(err) or file_error(err)
        if line is None:
            raise
        if debugging():
            traceback.print_exception(err, file=sys.stderr)
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)
    if report_time:
        logging.getLogger(name).info("done in %.1f s", time.monotonic() - started)
    sys.exit(code)


def log(name: str) -> logging.Logger:
    return logging.getLogger(name)


# What the pipeline itself rewrites while it runs (DVC's lock file, the committed metrics outs): changed, they
# do not make a run's code differ from its commit. Before this, every stage after the first one recorded "-dirty".
PIPELINE_WRITES = ("dvc.lock", "metrics")


def git_revision(root: Path = REPO_ROOT) -> str:
    """HEAD's commit, with "-dirty" when a tracked file other than the pipeline's own records differs from it."""
    unchanged = [f":(top,exclude){path}" for path in PIPELINE_WRITES]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *unchanged],
                               cwd=root, capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if rev.returncode:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def absolute(path: str) -> str:
    """Local paths become absolute (Ray workers and jobs run elsewhere); URLs pass through."""
    return path if "://" in path else str(Path(path).resolve())


def state_root() -> Path:
    """Where what DVC does not track lives: checkpoints (ray.storage_path), a sweep's Tune state, the sqlite MLflow
    store with its artifacts, worker logs. That is the project root, except in the copy of the workspace that
    `dvc exp run --temp` or a queued experiment runs in (deleted once DVC has collected its outs): there DVC names
    the project in DVC_ROOT, and the runs and the MLflow store stay in it, beside the workspace's own."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def state_path(path: str) -> str:
    """A location of such state: relative paths under state_root(), absolute ones and URLs as they are."""
    return path if "://" in path else str(state_root() / path)


def portable(path: str) -> str:
    """A location to record in what is shared (exports, registered models): relative to the project's state root
    when it is inside it, so no file names the machine that made it; other local paths and URLs as they are."""
    if "://" in path:
        return path
    try:
        return str(Path(path).resolve().relative_to(state_root()))
    except ValueError:
        return path


ROOT_VARIABLE = "GENFORGE_ROOT"


def submitted_job_copy() -> str | None:
    """The directory of Ray's temporary copy of the working dir when this process is the driver of a job
    submitted with `ray job submit --working-dir` (deleted when the job ends), else None."""
    import json

    try:
        runtime_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


def enter_project_root() -> str:
    """Relative paths in params (data, models, metrics, runs, the sqlite tracking store) resolve against the
    working directory, which `dvc repro` sets to the project root. GENFORGE_ROOT, when set, is that root instead:
    a submitted Ray job runs in a temporary copy of the working dir, and outputs written there would be lost.
    Inside a DVC stage it is not used: DVC reads and writes the outs in its workspace.
    Returns the directory the process started in ("" when it stays there)."""
    root = os.environ.get(ROOT_VARIABLE)
    if root and not os.environ.get("DVC_STAGE"):
        path = Path(root)
        if not path.is_absolute() or not path.is_dir():
            raise StageError(f"{ROOT_VARIABLE}={root}: not an absolute path to a directory (it is where relative paths in params resolve)")
        started_in = os.getcwd()
        os.chdir(path)
        return started_in
    copy = submitted_job_copy()
    if copy:
        raise StageError(f"this job runs in Ray's temporary copy of the working dir ({copy}), deleted when the job ends, so relative "
                         f"paths in params would read and write there: set {ROOT_VARIABLE} to the project directory on storage "
                         "every node reaches (--runtime-env-json '{\"env_vars\": {\"GENFORGE_ROOT\": \"/path\"}}')")  # fmt: skip
    return ""


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def inception_progress(logger: logging.Logger) -> Callable[[int, int, float], None]:
    """A progress callback for gen_core.metrics.inception_stats that logs done/total, rate and eta."""
    return lambda done, total, rate: logger.info("inception %d/%d images, %.1f img/s, eta %s", done, total, rate,
                                                 format_duration((total - done) / rate))  # fmt: skip
