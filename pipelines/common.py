"""Shared plumbing for stage entry points: arguments, typed config, one-line errors, provenance."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from gen_core.checkpoint import CheckpointError
from gen_core.config import ConfigError, RunConfig, load_config
from gen_core.data import DataError
from gen_core.metrics import FeatureNetError

REPO_ROOT = Path(__file__).resolve().parent.parent


class StageError(RuntimeError):
    """A stage cannot go on (unreachable server, missing upstream output...). One-line message."""


EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, FeatureNetError, StageError)


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
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


def run_stage(name: str, body: Callable[[RunConfig, argparse.Namespace], int | None], parser: argparse.ArgumentParser | None = None) -> None:
    """Parse args, load the typed config, run `body`, and turn expected failures into one line + exit 2."""
    parser = parser or stage_parser(f"genforge {name} stage")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    started = time.monotonic()
    try:
        cfg = load_config(args.params, args.overrides, args.overlays)
        code = body(cfg, args) or 0
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    logging.getLogger(name).info("done in %.1f s", time.monotonic() - started)
    sys.exit(code)


def log(name: str) -> logging.Logger:
    return logging.getLogger(name)


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if rev.returncode:
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def absolute(path: str) -> str:
    """Local paths become absolute (Ray workers and jobs run elsewhere); URLs pass through."""
    return path if "://" in path else str(Path(path).resolve())


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
