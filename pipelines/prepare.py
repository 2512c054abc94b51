"""Stage `prepare`: source -> validated uint8 shards, train/eval split, manifest.

    python -m pipelines.prepare [--params params.yaml] [--set data.source=mnist5k]
"""

from __future__ import annotations

from gen_core.config import RunConfig
from gen_core.data import read_source, split_train_eval, write_prepared
from pipelines.common import log, run_stage


def prepare(cfg: RunConfig) -> dict:
    logger = log("prepare")
    data = cfg.data
    logger.info("reading %s from %s", data.source, data.source_uri or "its offline default")
    raw = read_source(data)
    train, evals = split_train_eval(raw, data)
    manifest = write_prepared(data.out_dir, train, evals, raw, data)
    logger.info(
        "wrote %s: %d train / %d eval images, shape %s, %d classes, %d skipped",
        data.out_dir, len(train.labels), len(evals.labels), manifest["shape"], len(raw.class_names), len(raw.skipped),
    )  # fmt: skip
    for skipped in raw.skipped:
        logger.warning("skipped %s: %s", skipped["file"], skipped["reason"])
    return manifest


def main() -> None:
    run_stage("prepare", lambda cfg, args: prepare(cfg) and None)


if __name__ == "__main__":
    main()
