"""Stage `prepare`: source -> validated uint8 shards, train/eval split, manifest.

    python -m pipelines.prepare [--params params.yaml] [--set data.source=mnist5k]
"""

from __future__ import annotations

from gen_core.config import RunConfig
from gen_core.data import read_source, settings_that_do_not_fit, split_train_eval, write_prepared
from pipelines.common import StageError, log, run_stage


def prepare(cfg: RunConfig) -> dict:
    logger = log("prepare")
    data = cfg.data
    logger.info("reading %s from %s", data.source, data.source_uri or "its offline default")
    raw = read_source(data)
    _check_size(cfg, raw)
    train, evals = split_train_eval(raw, data)
    manifest = write_prepared(data.out_dir, train, evals, raw, data)
    logger.info(
        "wrote %s: %d train / %d eval images, shape %s, %d classes, %d skipped",
        data.out_dir, len(train.labels), len(evals.labels), manifest["shape"], len(raw.class_names), len(raw.skipped),
    )  # fmt: skip
    for skipped in raw.skipped:
        logger.warning("skipped %s: %s", skipped["file"], skipped["reason"])
    return manifest


def _check_size(cfg: RunConfig, raw) -> None:
    """Every setting that is too large for this dataset, in one message with the values that fit. Those settings
    (evaluate.*, <family>.evaluation) decide only whether later stages can run, not what prepare writes, so they are
    not among this stage's DVC params: changing them does not redo the data."""
    fixes = settings_that_do_not_fit(cfg, raw)
    if not fixes:
        return
    where = cfg.data.source_uri or cfg.data.source
    listed = "; ".join(f"{key} {now} -> {fits} ({why})" for key, (now, fits, why) in fixes.items())
    sets = " ".join(f"-S {key}={fits}" for key, (_, fits, _) in fixes.items())
    raise StageError(f"{where}: {len(raw.train.labels)} images in {len(raw.class_names)} classes are too few for {len(fixes)} "
                     f"setting(s): {listed}. Set them in params.yaml, or: dvc exp run {sets}")  # fmt: skip


def main() -> None:
    run_stage("prepare", lambda cfg, args: prepare(cfg) and None)


if __name__ == "__main__":
    main()
