"""Race `python -m pipelines.register` processes against each other (used by test_registry_concurrency).

    python tests/registry_race.py RACES.json OUT_DIR

RACES.json: a list of races, each a list of argument lists for pipelines.register. For every race
this process forks one child per argument list (the imports and MLflow's package scan are paid once,
here, so a race costs seconds), the children wait on one barrier and then run the register stage's
real entry point, each with its own stdout/stderr files: OUT_DIR/<race>-<i>.out|.err|.rc.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

from mlflow.utils.requirements_utils import _init_modules_to_packages_map

import pipelines.register  # noqa: F401  (imported before forking: the children start warm)

# Also warm: MLflow maps every installed package's files to its modules (about 3 s of CPU) the first time a
# process logs a model, to check the model's requirements; every child would otherwise redo it.
_init_modules_to_packages_map()


def _child(barrier, args: list[str], prefix: str) -> None:
    out, err = os.open(f"{prefix}.out", os.O_WRONLY | os.O_CREAT, 0o644), os.open(f"{prefix}.err", os.O_WRONLY | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.argv = ["pipelines.register", *args]
    barrier.wait()
    code = 0
    try:
        pipelines.register.main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    Path(f"{prefix}.rc").write_text(str(code))
    os._exit(code)


def main() -> None:
    races, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    context = multiprocessing.get_context("fork")
    for number, race in enumerate(races):
        barrier = context.Barrier(len(race))
        children = [context.Process(target=_child, args=(barrier, args, str(out_dir / f"{number}-{i}"))) for i, args in enumerate(race)]
        for child in children:
            child.start()
        for child in children:
            child.join(300)
        print(f"race {number}: exit codes {[child.exitcode for child in children]}", flush=True)


if __name__ == "__main__":
    main()
