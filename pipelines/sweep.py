"""Stage `sweep`: Ray Tune over one model family's training, best trial through the registry gate.

    python -m pipelines.sweep --set sweep.enabled=true            # or: dvc exp run -S sweep.enabled=true
    python -m pipelines.sweep --set sweep.enabled=true --set sweep.scheduler=pbt

Every trial is a real Ray Train run of the family's training stage (pipelines.train_gan or
pipelines.train_ldm): the same loop, checkpoints and MLflow logging, with `sweep.workers_per_trial`
workers. A trial of one (DDP) worker runs the same loop in its Tune trial's own process, which
reserves that worker's CPUs (GPU): Ray Train would start a worker group and its controller for it.
At each checkpoint (every `sweep.report_every_steps`) a trial reports a cheap classifier-
feature FID at fixed seeds (pipelines.probe), which ASHA/PBT compare; its last checkpoint also
reports Inception `fid` on `sweep.final_fid_samples` samples, which picks the best trial.

- asha / fifo: one Ray Train run per trial; Tune's TuneReportCallback streams the reports (in
  process, the checkpoint store reports to Tune), and ASHA stops weak trials between checkpoints.
- pbt: a trial trains one perturbation interval per Ray Train run and hands Tune a checkpoint
  pointer. On exploit, the trial copies the better trial's training checkpoint and continues it
  with its mutated learning rates.

Tune's state lives in <sweep.storage_path>/<sweep.name>; running the same name again resumes an
interrupted sweep with Tuner.restore. MLflow gets one parent run per sweep and one child run per
trial. Outputs in <sweep.out_dir>/: best_params.yaml (an overlay for params.yaml), trials.csv,
model/ (the best trial's export), best_trial_params.yaml (its full config), eval/ and register/ (what the
evaluate and register stages wrote for it); <sweep.metrics_file> (DVC metrics). The best model is evaluated
and gated by those two stages, run as processes of their own, exactly as after a training stage.
With `sweep.enabled: false` the stage only records that it is off.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from gen_core.config import EVAL_METRIC_MODES, LR_RATIO_KEY, ConfigError, ModelOutputs, RunConfig, SearchDimension, config_from_dict
from gen_core.data import read_manifest
from gen_core.io import atomic_directory, atomic_write_bytes, atomic_write_json, download_directory, upload_directory
from gen_core.metrics import load_ref_stats
from pipelines.common import StageError, absolute, error_line, format_duration, log, run_stage, stage_parser, state_path
from pipelines.probe import protocol_spec
from pipelines.ray_env import in_process_allowed, init_ray, run_uri, storage
from pipelines.ray_train import TrainingJob, job_signature, run_directory, train
from pipelines.tracking import connect, redact, tracking_uri
from pipelines.worker import history_csv, list_checkpoints

TRIAL_TAG = "tune_trial_id"
# A trial of several workers: its actor only drives its Ray Train run, whose workers reserve the CPUs (GPUs).
# Ray wants a non-empty request, and any CPU here would leave a cluster-sized set of trials one CPU short.
TRIAL_ACTOR = {"CPU": 0, "memory": 256 * 1024**2}


def trains_in_process(cfg: RunConfig) -> bool:
    """Whether a trial trains in its own actor rather than on a Ray Train worker group: one DDP worker, by the
    rule a training stage follows (ray_env.in_process_allowed; ray.in_process: false keeps Ray Train). Ray Train
    would start a controller, a worker and helper actors for it, process start-up that costs about as much CPU
    as a short trial's training on 2 cores (benchmarks/RESULTS.md)."""
    return in_process_allowed(cfg, cfg.sweep.workers_per_trial)


def trial_resources(cfg: RunConfig) -> dict:
    """What a trial's actor reserves: its worker's CPUs (GPU) when it trains in process, else TRIAL_ACTOR."""
    if not trains_in_process(cfg):
        return TRIAL_ACTOR
    return {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})}


# ---------------------------------------------------------------------------
# Search space and trial configs (pure)
# ---------------------------------------------------------------------------


def tune_domain(dim: SearchDimension):
    from ray import tune

    if dim.type == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    if dim.type == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.type == "randint":
        return tune.randint(int(dim.low), int(dim.high) + 1)
    return tune.choice(list(dim.values))


def family_values(cfg: RunConfig, sampled: dict) -> dict:
    """Sampled knobs -> keys of the family's params section (the D/G ratio becomes lr_d)."""
    values = dict(sampled)
    if LR_RATIO_KEY in values:
        ratio = values.pop(LR_RATIO_KEY)
        values["lr_d"] = values.get("lr_g", cfg.gan.lr_g) * ratio
    return values


def trial_config(cfg: RunConfig, sampled: dict, trial_id: str, total_steps: int | None = None) -> RunConfig:
    """The family's training config for one trial: the sampled knobs, the sweep's length and cadence,
    the trial's own run directory and export location."""
    s = cfg.sweep
    section = cfg.family(s.family)
    total = total_steps or s.total_steps
    changes = {
        **family_values(cfg, sampled), "total_steps": total, "checkpoint_every_steps": min(s.report_every_steps, total),
        "log_every_steps": min(section.log_every_steps, total), "checkpoints_to_keep": max(section.checkpoints_to_keep, 2),
        "evaluation": section.evaluation.model_copy(update={"every_steps": None}),  # the sweep's own evaluation rules a trial
        **({"global_batch_size": s.global_batch_size} if s.global_batch_size else {}),
    }  # fmt: skip
    export = f"{local_root(cfg)}/exports/{trial_id}"
    trial = cfg.model_copy(update={
        s.family: section.model_copy(update={**changes, "run_name": f"trial-{trial_id}"}),
        "outputs": cfg.outputs.model_copy(update={s.family: ModelOutputs(out_dir=export, losses_file=f"{export}.losses.csv")}),
        "ray": cfg.ray.model_copy(update={"num_workers": s.workers_per_trial, "storage_path": f"{sweep_root(cfg)}/train",
                                          "max_failures": 0}),
    })  # fmt: skip
    return config_from_dict(trial.model_dump(mode="json"), f"sweep trial {trial_id}")  # model_copy does not validate


def check_space(cfg: RunConfig) -> None:
    """Every extreme value of the space must give a valid config, before any trial starts."""
    for key, dim in cfg.sweep.space[cfg.sweep.family].items():
        for value in dim.bounds():
            try:
                trial_config(cfg, {key: value}, "check")
            except ConfigError as err:
                raise ConfigError(f"sweep.space.{cfg.sweep.family}.{key} = {value!r}: {str(err).split(': ', 2)[-1]}") from None


def local_root(cfg: RunConfig) -> str:
    """Where trials export their models on the node that ran them: the sweep's storage when it is local,
    else runs/tune/<name>. The best model is re-exported from its checkpoint in storage, not from here."""
    path = cfg.sweep.storage_path if "://" not in cfg.sweep.storage_path else "runs/tune"
    return f"{state_path(path).rstrip('/')}/{cfg.sweep.name}"


def sweep_root(cfg: RunConfig) -> str:
    return f"{state_path(cfg.sweep.storage_path).rstrip('/')}/{cfg.sweep.name}"


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Tune runs trials in their own directories: every local path a trial reads must be absolute, and
    so must a relative sqlite tracking store. A tracking URI with credentials is not put into the
    config, which Tune and every checkpoint persist: trials read it from MLFLOW_TRACKING_URI instead,
    which the local Ray's workers inherit (on a cluster, set it in the job's runtime environment)."""
    raw = cfg.model_dump(mode="json")
    for section, key in (("data", "out_dir"), ("classifier", "out_dir"), ("ref_stats", "out_dir"), ("latents", "out_dir")):
        raw[section][key] = absolute(raw[section][key])
    for section in ("ray", "sweep"):
        raw[section]["storage_path"] = state_path(raw[section]["storage_path"])
    raw["outputs"]["autoencoder"]["out_dir"] = absolute(raw["outputs"]["autoencoder"]["out_dir"])
    uri = tracking_uri(cfg)
    if redact(uri) == uri:
        raw["tracking"]["tracking_uri"] = uri
    else:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        raw["tracking"]["tracking_uri"] = None
    return config_from_dict(raw, "sweep")


def training_job(cfg: RunConfig) -> TrainingJob:
    if cfg.sweep.family == "gan":
        from pipelines.train_gan import training_job as job
    else:
        from pipelines.train_ldm import training_job as job
    return job(cfg)


# ---------------------------------------------------------------------------
# The trial (runs in a Tune trial actor)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSettings:
    base: dict  # RunConfig with absolute paths
    probe: dict  # EvaluationSpec: the trials' evaluation during training
    parent_run_id: str


def run_trial(sampled: dict, settings: TrialSettings) -> None:
    from ray import tune

    base = RunConfig.model_validate(settings.base)
    trial_id = tune.get_context().get_trial_id()
    tags = {TRIAL_TAG: trial_id, "sweep": base.sweep.name}
    if base.sweep.scheduler == "pbt":
        return _run_trial_in_intervals(base, sampled, trial_id, settings, tags)
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base, sampled, trial_id)
    job = replace(training_job(cfg), evaluation=settings.probe)
    in_process = trains_in_process(base)  # then its checkpoint store reports to Tune itself
    # a trial restarted by a resumed sweep continues its child run, also when it was stopped before its first checkpoint
    train(cfg, job, callbacks=() if in_process else (TuneReportCallback(),), parent_run_id=settings.parent_run_id, run_tags=tags,
          mlflow_run_id=_trial_mlflow_run(base, trial_id, settings.parent_run_id), in_process=in_process, tune_reports=in_process)  # fmt: skip


def _run_trial_in_intervals(base: RunConfig, sampled: dict, trial_id: str, settings: TrialSettings, tags: dict) -> None:
    """PBT: one Ray Train run per perturbation interval, then a Tune checkpoint that points at the
    training checkpoint. A checkpoint from another trial (exploit) is copied into this config's run."""
    from ray import tune

    s = base.sweep
    interval = s.report_every_steps * s.pbt.perturbation_interval
    cfg = trial_config(base, sampled, trial_id)
    job = replace(training_job(cfg), evaluation=settings.probe)
    own = _own_run(cfg, job)
    handed, child_run = tune.get_checkpoint(), _trial_mlflow_run(base, trial_id, settings.parent_run_id)
    if handed is not None:
        with handed.as_directory() as directory:
            pointer = json.loads((Path(directory) / "pointer.json").read_text())
        if not pointer["checkpoint"].startswith(own):
            _adopt(pointer["checkpoint"], own, _signature(cfg, job), child_run)
    done = max((meta["step"] for _, meta in list_checkpoints(own)), default=0)
    while done < s.total_steps:
        target = min((done // interval + 1) * interval, s.total_steps)
        # the job (resume signature, upstream checks) does not depend on total_steps: build it once
        train(trial_config(base, sampled, trial_id, total_steps=target), job, parent_run_id=settings.parent_run_id, run_tags=tags,
              mlflow_run_id=child_run, in_process=trains_in_process(base))  # fmt: skip
        uri, meta = list_checkpoints(own)[0]
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / "pointer.json").write_text(json.dumps({"checkpoint": uri, "step": meta["step"]}))
            tune.report({**meta.get("evaluation", {}), "step": meta["step"]}, checkpoint=tune.Checkpoint.from_directory(directory))
        done = meta["step"]


def _signature(cfg: RunConfig, job: TrainingJob) -> str:
    return job_signature(cfg, job, len(read_manifest(cfg.data.out_dir)["class_names"]))


def _own_run(cfg: RunConfig, job: TrainingJob) -> str:
    return run_uri(cfg, run_directory(cfg, job, _signature(cfg, job)))


def _trial_mlflow_run(cfg: RunConfig, trial_id: str, parent_run_id: str) -> str | None:
    """The trial's child run of this sweep's parent run, if it has one yet."""
    mlflow = connect(cfg)
    runs = mlflow.search_runs(filter_string=f"tags.{TRIAL_TAG} = '{trial_id}' and tags.mlflow.parentRunId = '{parent_run_id}'",
                              output_format="list", max_results=1)  # fmt: skip
    return runs[0].info.run_id if runs else None


def _adopt(checkpoint_uri: str, run_uri_: str, signature: str, mlflow_run_id: str | None) -> None:
    """Copy another trial's checkpoint into this run as its newest, re-signed for this config (PBT exploit)."""
    with tempfile.TemporaryDirectory() as local:
        download_directory(checkpoint_uri, local)
        meta_path = Path(local) / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta.update(signature=signature, mlflow_run_id=mlflow_run_id, handoff_from=checkpoint_uri)
        meta_path.write_text(json.dumps(meta))
        upload_directory(local, f"{run_uri_.rstrip('/')}/checkpoint_handoff_step{meta['step']:07d}_{int(time.time())}")


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def concurrent_trials(cfg: RunConfig, resources: dict) -> int:
    """How many trials fit the cluster at once: its CPUs (GPUs) over what one trial's workers take."""
    s, r = cfg.sweep, cfg.ray
    fits = int(resources.get("CPU", 0) // (s.workers_per_trial * r.cpus_per_worker))
    if r.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // s.workers_per_trial))
    if fits < 1:
        need = f"{s.workers_per_trial * r.cpus_per_worker} CPUs" + (f" and {s.workers_per_trial} GPUs" if r.use_gpu else "")
        raise StageError(f"a sweep trial needs {need}; the Ray cluster has {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
    return min(fits, s.max_concurrent_trials or fits, s.num_trials)


def _scheduler(cfg: RunConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = cfg.sweep
    if s.scheduler == "asha":
        reports = math.ceil(s.total_steps / s.report_every_steps)
        return ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=min(s.asha.grace_period, reports),
                             reduction_factor=s.asha.reduction_factor)  # fmt: skip
    if s.scheduler == "pbt":
        space = s.space[s.family]
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=s.pbt.perturbation_interval,
            hyperparam_mutations={key: tune_domain(dim) for key, dim in space.items()},
            quantile_fraction=s.pbt.quantile_fraction, resample_probability=s.pbt.resample_probability, synch=s.pbt.synch,
        )  # fmt: skip
    return FIFOScheduler()


def _searcher(cfg: RunConfig, concurrency: int):
    s = cfg.sweep
    if s.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:
            raise StageError(f"sweep.searcher optuna: {err} (pip install optuna)") from None
        return OptunaSearch(seed=s.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrency)


def _check_inputs(cfg: RunConfig) -> None:
    for name in ("classifier.npz", "inception.npz"):
        load_ref_stats(f"{cfg.reference_dir}/{name}")  # one line if missing (run the ref_stats stage)
    if not Path(cfg.classifier.out_dir, "classifier.safetensors").exists():
        raise StageError(f"{cfg.classifier.out_dir}: no trained classifier (run the classifier stage first)")


def _parent_run(cfg: RunConfig, mlflow, resumed: bool) -> str:
    """One MLflow run per sweep; a resumed sweep continues its run."""
    if resumed:
        found = mlflow.search_runs(filter_string=f"tags.sweep_parent = '{cfg.sweep.name}'", output_format="list", max_results=1)
        if found:
            return found[0].info.run_id
    with mlflow.start_run(run_name=cfg.sweep.name) as run:
        s = cfg.sweep
        mlflow.set_tags({"sweep_parent": s.name, "model_family": s.family})
        mlflow.log_params({f"sweep.{k}": str(v) for k, v in s.model_dump(mode="json").items() if k != "space"})
        mlflow.log_dict(s.model_dump(mode="json")["space"], "search_space.json")
        return run.info.run_id


def _record_disabled(cfg: RunConfig, logger) -> dict:
    record = {"enabled": False}
    with atomic_directory(cfg.sweep.out_dir) as tmp:
        (tmp / "README.txt").write_text("sweep.enabled is false: no sweep ran. `dvc exp run -S sweep.enabled=true` runs one.\n")
    atomic_write_json(cfg.sweep.metrics_file, record)
    logger.info("sweep.enabled is false: nothing to do (dvc exp run -S sweep.enabled=true)")
    return record


def _tuner(cfg: RunConfig, trainable, storage_path: str, experiment: str, storage_fs, concurrency: int, resumed: bool):
    """A new Tuner, or the interrupted sweep's, restored from its storage."""
    from ray import tune

    s = cfg.sweep
    if resumed:
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage_fs)
    space = {key: tune_domain(dim) for key, dim in s.space[s.family].items()}
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode, num_samples=s.num_trials, scheduler=_scheduler(cfg),
            search_alg=_searcher(cfg, concurrency), max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(name=s.name, storage_path=storage_path, storage_filesystem=storage_fs, verbose=1,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                                  failure_config=tune.FailureConfig(fail_fast=stops_at_first_error(cfg))),
    )  # fmt: skip


def stops_at_first_error(cfg: RunConfig) -> bool:
    """Synchronous PBT waits at each perturbation point for every trial, a failed one too: Tune would
    keep the others paused for ever (ray-project/ray#12122), so such a sweep stops at its first failure."""
    return cfg.sweep.scheduler == "pbt" and cfg.sweep.pbt.synch


def check_ended(cfg: RunConfig, results, wall: float, parent: str) -> None:
    """One line when the sweep cannot be finished: a synchronous PBT trial failed (its child run is closed as
    FAILED, the others' as KILLED: Tune stopped them), or Ctrl-C stopped it (the runs stay open for the resume)."""
    s = cfg.sweep
    failed = [result for result in results if result.error]
    if failed and stops_at_first_error(cfg):
        statuses = {row["trial_id"]: "error" if row["status"] == "error" else "stopped" for row in trial_rows(cfg, results)}
        _close_trial_runs(connect(cfg), parent, statuses)
        raise StageError(f"sweep {s.name}: trial {_trial_id(failed[0])} failed: {error_line(failed[0].error)}; a synchronous PBT "
                         "sweep stops at its first failed trial (with sweep.pbt.synch: false the others go on)")  # fmt: skip
    if results.num_terminated + results.num_errors < s.num_trials:  # Ctrl-C: Tune saved its state and returned
        raise StageError(f"sweep {s.name} interrupted after {format_duration(wall)}; run the same command again to resume it")


def run(cfg: RunConfig) -> dict:
    logger = log("sweep")
    s = cfg.sweep
    if not s.enabled:
        return _record_disabled(cfg, logger)
    check_space(cfg)
    _check_inputs(cfg)
    cfg = with_absolute_paths(cfg)
    training_job(trial_config(cfg, {}, "check"))  # the family's own upstream checks (e.g. latents vs autoencoder)

    from ray import tune

    ray = init_ray(cfg, dashboard=True)  # its State API releases the placement groups of stopped trials (start_local_ray)
    try:
        resources = ray.cluster_resources()
        concurrency = concurrent_trials(cfg, resources)
        storage_path, storage_fs = storage(cfg, cfg.sweep.storage_path)
        experiment = f"{storage_path.rstrip('/')}/{s.name}"
        resumed = tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs)
        mlflow = connect(cfg)
        parent = _parent_run(cfg, mlflow, resumed)
        probe = protocol_spec(
            cfg, cfg.classifier.out_dir, cfg.reference_dir, num_samples=s.probe_samples, every_steps=s.report_every_steps,
            final_step=s.total_steps, final_inception_samples=s.final_fid_samples,
            metric=s.metric if s.metric in EVAL_METRIC_MODES else "fid_classifier",
            guidance_scale=getattr(getattr(cfg, s.family).evaluation, "guidance_scale", None),  # judged as its training run would be
        )  # fmt: skip
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, settings=TrialSettings(cfg.model_dump(mode="json"), asdict(probe), parent)), trial_resources(cfg),
        )  # fmt: skip
        logger.info(
            "%s sweep of %d %s trials (%s, %s search), %d at a time on %g CPUs; state in %s",
            "resuming" if resumed else "new", s.num_trials, s.family, s.scheduler, s.searcher, concurrency, resources.get("CPU", 0), sweep_root(cfg),
        )  # fmt: skip
        started = time.monotonic()
        results = _tuner(cfg, trainable, storage_path, experiment, storage_fs, concurrency, resumed).fit()
        wall = time.monotonic() - started
    finally:
        ray.shutdown()
    check_ended(cfg, results, wall, parent)
    return finish(cfg, results, wall, parent, logger)


def trial_rows(cfg: RunConfig, results) -> list[dict]:
    s = cfg.sweep
    reports = math.ceil(s.total_steps / s.report_every_steps)
    rows = []
    for result in results:
        metrics = result.metrics or {}
        step = int(metrics.get("step", 0))
        status = "error" if result.error else ("completed" if step >= s.total_steps else "stopped early")
        rows.append({
            "trial_id": _trial_id(result), "status": status, "step": step,
            "reports": int(metrics.get("training_iteration", 0)), "of_reports": reports,
            s.metric: metrics.get(s.metric), "fid": metrics.get("fid"), "time_s": round(float(metrics.get("time_total_s", 0.0)), 1),
            **{k: v for k, v in result.config.items()},
        })  # fmt: skip
    return rows


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def finish(cfg: RunConfig, results, wall: float, parent: str, logger) -> dict:
    """The best finished trial, re-exported, evaluated and gated like any other version; the sweep's
    outputs (best_params.yaml, trials.csv, sweep.json) and its MLflow parent run."""
    s = cfg.sweep
    rows = trial_rows(cfg, results)
    completed = [row for row in rows if row["status"] == "completed" and row["fid"] is not None]
    errors = {row["trial_id"]: error_line(result.error) for row, result in zip(rows, results) if result.error}
    for trial_id, error in errors.items():
        logger.warning("trial %s failed: %s", trial_id, error)
    if not completed:
        raise StageError(f"sweep {s.name}: no trial finished" + (f" (first error: {next(iter(errors.values()))})" if errors else ""))
    best = min(completed, key=lambda row: row["fid"])
    sampled = {key: best[key] for key in s.space[s.family]}
    values = family_values(cfg, sampled)
    logger.info("best trial %s: fid %.2f (%s)", best["trial_id"], best["fid"], " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    evaluation, decision = _gate_best(cfg, trial_config(cfg, sampled, best["trial_id"]))

    out = Path(s.out_dir)
    overlay = {s.family: {k: (float(v) if isinstance(v, float) else v) for k, v in values.items()}}
    command = "dvc exp run " + " ".join(f"-S {s.family}.{k}={v}" for k, v in overlay[s.family].items())
    header = (f"# Best trial {best['trial_id']} of sweep {s.name}: Inception fid {best['fid']:.3f} on {s.final_fid_samples} samples\n"
              f"# after {s.total_steps} steps. Use it as an overlay:  python -m pipelines.train_{s.family} --overlay {out}/best_params.yaml\n"
              f"# or in the DVC pipeline:  {command}\n")  # fmt: skip
    atomic_write_bytes(out / "best_params.yaml", (header + yaml.safe_dump(overlay, sort_keys=True)).encode())
    atomic_write_bytes(out / "trials.csv", history_csv(rows).encode())  # every row has the same keys
    trial_time = sum(row["time_s"] for row in rows)
    record = {
        "enabled": True, "name": s.name, "family": s.family, "scheduler": s.scheduler, "searcher": s.searcher, "trials": len(rows),
        "completed": len(completed), "stopped_early": sum(row["status"] == "stopped early" for row in rows),
        "errors": len(errors), "trial_errors": errors, "best_trial": best["trial_id"], "best_trial_fid": best["fid"],
        "best_params": overlay[s.family], "eval_fid": evaluation["fid"], "eval_class_accuracy": evaluation["class_accuracy"],
        "promoted": decision["promoted"], "model_version": decision["version"], "wall_s": round(wall, 1),
        "sum_trial_s": round(trial_time, 1), "scheduling_overhead": round(wall / trial_time, 3) if trial_time else None,
        "dvc_exp_command": command,
    }  # fmt: skip
    atomic_write_json(out / "sweep.json", record)
    atomic_write_json(s.metrics_file, record)
    _record_in_mlflow(cfg, parent, rows, record, out)
    logger.info(
        "%d trials (%d completed, %d stopped early, %d errors) in %s; trials' own time %s (wall/sum %.2f)",
        len(rows), len(completed), record["stopped_early"], record["errors"], format_duration(wall), format_duration(trial_time),
        record["scheduling_overhead"] or 0,
    )  # fmt: skip
    return record


def _gate_best(cfg: RunConfig, best_cfg: RunConfig) -> tuple[dict, dict]:
    """The best trial's final checkpoint, exported to <sweep.out_dir>/model, then evaluated and gated like
    any other version -> (evaluation, gate decision)."""
    s, out = cfg.sweep, Path(cfg.sweep.out_dir)
    gated = best_cfg.model_copy(update={
        "outputs": best_cfg.outputs.model_copy(update={s.family: ModelOutputs(out_dir=str(out / "model"), losses_file=str(out / "losses.csv"))}),
        "evaluate": cfg.evaluate.model_copy(update={"out_dir": str(out / "eval")}),
        "registry": cfg.registry.model_copy(update={"out_dir": str(out / "register")}),
    })  # fmt: skip
    train(gated, training_job(gated))  # the same run directory as the trial's: only exports
    # Evaluated and registered by the stages themselves, each in a process of its own: this process has had
    # its Ray (Tune's), and a second local Ray started in one process crashed it at exit once in CI (SIGSEGV);
    # nor can the evaluation reuse Tune's Ray, where a stopped trial's worker group can keep its CPUs.
    # The config file holds no credentials (with_absolute_paths moved them to the environment).
    params = out / "best_trial_params.yaml"
    atomic_write_bytes(params, yaml.safe_dump(gated.model_dump(mode="json"), sort_keys=False).encode())
    for stage in ("evaluate", "register"):
        done = subprocess.run([sys.executable, "-m", f"pipelines.{stage}", "--params", str(params), "--family", s.family], check=False)
        if done.returncode:
            raise StageError(f"sweep {s.name}: the {stage} stage failed on the best trial (exit {done.returncode}; its error is above)")
    return json.loads(Path(gated.eval_file(s.family)).read_text()), json.loads(Path(gated.registry.out_dir, f"{s.family}.json").read_text())


def _record_in_mlflow(cfg: RunConfig, parent: str, rows: list[dict], record: dict, out: Path) -> None:
    mlflow = connect(cfg)
    _close_trial_runs(mlflow, parent, {row["trial_id"]: row["status"] for row in rows})
    with mlflow.start_run(run_id=parent):
        mlflow.log_metrics({"best_trial_fid": record["best_trial_fid"], "eval_fid": record["eval_fid"], "wall_s": record["wall_s"],
                            "stopped_early": record["stopped_early"]})  # fmt: skip
        mlflow.log_artifact(str(out / "trials.csv"))
        mlflow.log_artifact(str(out / "best_params.yaml"))
        mlflow.set_tags({"best_trial": record["best_trial"], "promoted": str(record["promoted"])})


def _close_trial_runs(mlflow, parent: str, status: dict[str, str]) -> None:
    """Tag each trial's child run with how it ended, and give it the matching status: Tune ends a trial's
    process at its last report (a completed one's too) before its run is closed, and a stopped trial's run
    may have closed as FAILED on the way out. completed: FINISHED, stopped (early, or by the sweep's end): KILLED,
    error: FAILED."""
    client = mlflow.MlflowClient()
    for run in mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent}'", output_format="list"):
        trial_status = status.get(run.data.tags.get(TRIAL_TAG, ""))
        if trial_status is None:
            continue
        client.set_tag(run.info.run_id, "sweep_trial_status", trial_status)
        wanted = {"completed": "FINISHED", "error": "FAILED"}.get(trial_status, "KILLED")
        if run.info.status != wanted:
            client.set_terminated(run.info.run_id, status=wanted)


def main() -> None:
    run_stage("sweep", lambda cfg, args: run(cfg) and None, stage_parser("genforge sweep stage (Ray Tune)", stage="sweep"))


if __name__ == "__main__":
    main()
