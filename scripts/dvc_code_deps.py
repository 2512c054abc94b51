"""Rewrite the code deps of every stage in the DVC pipelines (dvc.yaml, conditional/dvc.yaml) from the import graph
(what tests/test_architecture.py checks).

    python scripts/dvc_code_deps.py          # rewrites them in place; data/config deps are kept as they are
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines.common import PIPELINE_FILES  # noqa: E402
from tests.test_architecture import PACKAGES, closure, qualified, stage_modules  # noqa: E402


def flow_list(items: list[str], indent: int, width: int = 118) -> str:
    lines, current = [], ""
    for item in items:
        piece = f'"{item}"' if item.startswith("$") else item
        if current and len(current) + len(piece) + 2 > width - indent:
            lines.append(current.rstrip())
            current = ""
        current += piece + ", "
    lines.append(current.rstrip(", "))
    return "[ " + ("\n" + " " * indent + "  ").join(lines) + " ]"


def main() -> None:
    modules = stage_modules()
    for pipeline in PIPELINE_FILES:
        rewrite(REPO / pipeline, {stage: modules[qualified(pipeline, stage)] for stage in yaml.safe_load((REPO / pipeline).read_text())["stages"]})


def rewrite(path: Path, modules: dict[str, str]) -> None:
    text, parsed = path.read_text(), yaml.safe_load(path.read_text())
    for stage, entry in parsed["stages"].items():
        other = [d for d in (entry.get("do") or entry)["deps"] if not (d.endswith(".py") and d.split("/")[0] in PACKAGES)]
        code = sorted(closure(modules[stage]), key=lambda p: (not p.startswith("pipelines"), p))
        start = text.index("deps: [", text.index(f"  {stage}:\n"))
        end = text.index("]", start) + 1
        indent = start - text.rindex("\n", 0, start) - 1
        text = text[:start] + "deps: " + flow_list(other + code, indent) + text[end:]
    path.write_text(text)


if __name__ == "__main__":
    main()
