"""The Ray Train driver every training stage shares (GAN, autoencoder, latent denoiser).

A stage describes itself as a `TrainingJob` (its worker loop, its export) and calls `train`:

- the run directory <ray.storage_path>/<section.run_name>-<kind>-<signature>: the same config
  resumes there (also with a larger total_steps), a changed one trains afresh in its own;
- the MLflow run (created once, continued on resume);
- fitting with TorchTrainer (one local DDP worker: the worker loop in this process, see
  ray_env.trains_in_process), then exporting from the final checkpoint.

The worker side (rank, reporting, checkpoint storage) is pipelines.worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from gen_core.checkpoint import load_checkpoint
from gen_core.config import ModelOutputs, RunConfig
from gen_core.data import dataset_hash, read_manifest
from gen_core.io import atomic_directory, atomic_write_bytes, download_directory, filesystem
from gen_core.training import config_signature
from pipelines.common import REPO_ROOT, StageError, absolute, error_line, git_revision, log, portable, state_root
from pipelines.ray_env import (
    answers_state_api, init_ray, require_gpus, route_ray_logs, route_worker_logs, run_uri, storage, trains_in_process,
)  # fmt: skip
from pipelines.strategy import check_resumable, deepspeed_config
from pipelines.tracking import RunLog, connect, tracking_uri
from pipelines.probe import evaluation_spec
from pipelines.worker import RunContext, best_checkpoint, list_checkpoints, none_loadable, refused_state_file, retire_checkpoints


# ---------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------


def flat_params(cfg: RunConfig, sections: tuple[str, ...]) -> dict[str, str]:
    out = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out[f"{prefix}{key}"] = str(value)

    dumped = cfg.model_dump(mode="json")
    walk("", {name: dumped[name] for name in sections})
    return out


@dataclass(frozen=True)
class TrainingJob:
    """One training stage, described for the shared driver."""

    stage: str  # e.g. "train_ldm"
    kind: str  # what is trained, in the run directory's name and the MLflow tag: gan | autoencoder | ldm | pixel
    section: str  # the params section of its hyperparameters (gan | autoencoder | ldm), also its `outputs` entry
    worker_loop: Callable[[dict], None]  # runs on every Ray Train worker with {"run": config, "context": RunContext}
    export: Callable[[RunConfig, str, RunContext, RunLog], dict]  # (cfg, checkpoint_uri, context, run_log) -> meta
    inputs: dict = field(default_factory=dict)  # what else a checkpoint must share to be resumed (the autoencoder)
    extra: dict = field(default_factory=dict)  # stage-specific plain data for the workers (e.g. directories)
    logged_sections: tuple[str, ...] = ("data", "ray")
    evaluation: dict | None = None  # a sweep's own evaluation (pipelines.probe.EvaluationSpec); else <section>.evaluation


def job_signature(cfg: RunConfig, job: TrainingJob, num_classes: int) -> str:
    """What names the run directory and must match for a checkpoint to be resumed: the section's
    fields minus those that may change on resume (TrainingConfig.resumable_fields), the image shape,
    the job's inputs, the class count and the kind."""
    section = getattr(cfg, job.section)
    return config_signature({
        "section": section.resume_signature(), "resolution": cfg.data.resolution, "channels": cfg.data.channels,
        "inputs": job.inputs, "num_classes": num_classes, "kind": job.kind,
    })  # fmt: skip


def run_directory(cfg: RunConfig, job: TrainingJob, signature: str) -> str:
    """<section.run_name>-<kind>-<signature>: the run's name is per family (gan.run_name, ...)."""
    return f"{getattr(cfg, job.section).run_name}-{job.kind}-{signature[:8]}"


def train(cfg: RunConfig, job: TrainingJob, *, callbacks: tuple = (), parent_run_id: str | None = None,
          run_tags: dict | None = None, mlflow_run_id: str | None = None, in_process: bool | None = None, tune_reports: bool = False) -> dict:  # fmt: skip
    """Train (or resume, or only export) one job. `callbacks` go to the TorchTrainer (a sweep passes
    Tune's report callback); `parent_run_id` makes a new MLflow run a child run (one per sweep trial);
    `mlflow_run_id` is the run to continue when no checkpoint names one (a sweep trial restarted before its
    first checkpoint keeps its one child run); `in_process`: the worker loop runs in this process as the
    only worker, without Ray Train (None: ray_env.trains_in_process decides; a sweep says it for its trials),
    and with `tune_reports` passes its checkpoints' metrics to the trial, as Tune's report callback does for
    a worker group (RunContext)."""
    if in_process is None:
        in_process = trains_in_process(cfg)
    require_gpus(cfg, in_process)
    data_uri = absolute(cfg.data.out_dir)
    manifest = read_manifest(data_uri)
    if manifest["shape"] != [cfg.data.channels, cfg.data.resolution, cfg.data.resolution]:
        raise StageError(f"{data_uri}: prepared shape {manifest['shape']} does not match data.channels/resolution")
    num_classes = len(manifest["class_names"])
    signature = job_signature(cfg, job, num_classes)
    run_dir = run_directory(cfg, job, signature)
    run_dir, existing, export_uri = _plan(cfg, job, run_dir)
    deepspeed = None
    if cfg.ray.strategy == "deepspeed":  # the file is read here: workers may run elsewhere. It is code: relative to the repo
        deepspeed = deepspeed_config(str(REPO_ROOT / cfg.ray.deepspeed.config), getattr(cfg, job.section).global_batch_size, cfg.ray.num_workers)

    mlflow = connect(cfg)
    run_id = existing["mlflow_run_id"] if existing else mlflow_run_id
    data_hash, revision = dataset_hash(data_uri), git_revision()

    def run_context(mlflow_run_id: str) -> RunContext:
        return RunContext(
            stage=job.stage, section=job.section, data_uri=data_uri, num_classes=num_classes, signature=signature,
            run_uri=run_uri(cfg, run_dir), data_hash=data_hash, git_revision=revision, tracking_uri=tracking_uri(cfg),
            mlflow_run_id=mlflow_run_id, extra=job.extra, deepspeed=deepspeed,
            evaluation=job.evaluation or evaluation_spec(cfg, job.section), in_process=in_process, tune_reports=tune_reports,
        )  # fmt: skip

    if export_uri is None:  # training: the MLflow run is open (and marked FAILED if training fails)
        run_name = None if run_id else f"{getattr(cfg, job.section).run_name}-{job.kind}"
        with mlflow.start_run(run_id=run_id, run_name=run_name, parent_run_id=None if run_id else parent_run_id) as active:
            if existing is None:  # a continued trial run logs the same values again, which MLflow accepts
                mlflow.log_params(flat_params(cfg, (job.section, *job.logged_sections)))
                mlflow.set_tags({"git_revision": revision, "data_hash": data_hash, "trained_kind": job.kind, **(run_tags or {})})
                log_dataset(mlflow, cfg, data_uri, data_hash)
            context = run_context(active.info.run_id)
            export_uri = fit(cfg, job, context, run_dir, callbacks)
    else:
        context = run_context(run_id)
    # The run is closed: exporting logs to it without reopening it, so a failed export leaves its status alone.
    exported = _exported_checkpoint(cfg, job, context, export_uri)
    meta = job.export(cfg, exported, context, RunLog(context.mlflow_run_id))
    if exported != export_uri:  # the curves run to the last step, past the best one
        _publish_curves(getattr(cfg.outputs, job.section), export_uri)
    return meta


def _exported_checkpoint(cfg: RunConfig, job: TrainingJob, context: RunContext, last_uri: str) -> str:
    """The last checkpoint, or with `<section>.evaluation.export: best` the best evaluated one."""
    evaluation = getattr(getattr(cfg, job.section), "evaluation", None)  # generator sections only
    if job.evaluation is not None or evaluation is None or evaluation.every_steps is None or evaluation.export == "last":
        return last_uri
    found = best_checkpoint(context.run_uri)
    if found is None:
        return last_uri
    uri, record = found
    log(job.stage).info("exporting the best evaluated checkpoint: step %d (%s %.4f)", record["step"], evaluation.metric, record["value"])
    return uri


def _publish_curves(outputs: ModelOutputs, checkpoint_uri: str) -> None:
    fs, path = filesystem(checkpoint_uri)
    atomic_write_bytes(outputs.losses_file, fs.cat_file(f"{path.rstrip('/')}/losses.csv"))
    if outputs.eval_file:
        atomic_write_bytes(outputs.eval_file, fs.cat_file(f"{path.rstrip('/')}/evaluation.csv"))


def _plan(cfg: RunConfig, job: TrainingJob, run_dir: str) -> tuple[str, dict | None, str | None]:
    """-> (the run directory, meta of its newest checkpoint or None, the checkpoint to export without training
    or None). Resuming is checked here, before Ray starts. A longer total_steps resumes the run; a shorter one
    than it was trained to, with no checkpoint at that step, is a run of its own (`<run_dir>-to<N>`): the later
    model must not be exported as the shorter run's (`dvc exp run -S gan.total_steps=50` after a full run)."""
    logger, total_steps, uri = log(job.stage), getattr(cfg, job.section).total_steps, run_uri(cfg, run_dir)
    skipped: list[tuple[str, str]] = []
    checkpoints = list_checkpoints(uri, skipped)
    for where, why in skipped:
        logger.warning("skipping checkpoint %s: %s", where, why)
    if not checkpoints and skipped:
        raise StageError(f"{uri}: none of its {len(skipped)} checkpoint(s) is complete, so this run will not start over from step 0 "
                         f"on top of them; newest: {skipped[0][0]}: {skipped[0][1]}. Repair or remove them, or set {job.section}.run_name to train afresh")  # fmt: skip
    if not checkpoints:
        logger.info("new run %s in %s", run_dir, cfg.ray.storage_path)
        return run_dir, None, None
    newest_uri, newest = checkpoints[0]
    if newest.get("stopped_early"):
        logger.info("run %s stopped early at step %d (evaluation patience); exporting", run_dir, newest["step"])
        return run_dir, newest, newest_uri
    if newest["step"] > total_steps:
        exact = [found for found, meta in checkpoints if meta["step"] == total_steps]
        if not exact and not run_dir.endswith(f"-to{total_steps}"):
            logger.info("run %s is trained to step %d, past %s.total_steps %d with no checkpoint there: a shorter run of its own",
                        run_dir, newest["step"], job.section, total_steps)  # fmt: skip
            return _plan(cfg, job, f"{run_dir}-to{total_steps}")
        if not exact:  # cannot happen: a -to<N> run never trains past N
            raise StageError(f"{uri}: trained to step {newest['step']}, past {job.section}.total_steps {total_steps}")
        logger.info("run %s has a checkpoint at step %d; exporting it", run_dir, total_steps)
        return run_dir, newest, exact[0]
    if newest["step"] == total_steps:
        logger.info("run %s already trained to step %d; exporting", run_dir, total_steps)
        return run_dir, newest, newest_uri
    check_resumable(newest, cfg.ray.strategy, cfg.ray.num_workers, uri, job.section)
    _refuse_if_none_loads(uri, checkpoints, skipped, job.section)
    logger.info("resuming run %s from step %d (%s)", run_dir, newest["step"], cfg.ray.strategy)
    return run_dir, newest, None


def _refuse_if_none_loads(uri: str, checkpoints: list[tuple[str, dict]], skipped: list[tuple[str, str]], section: str) -> None:
    """The workers refuse a run none of whose checkpoints loads (rather than train from step 0 over them),
    but only once Ray and the workers are up. For local storage the driver answers first, in the same line,
    when the safe loader refuses a plain torch file of every complete checkpoint (a tampered or corrupt
    state.pt). The workers still check everything (strategy formats, remote storage) as they load."""
    if "://" in uri:
        return
    refused = []
    for where, _ in checkpoints:
        why = refused_state_file(Path(where))
        if why is None:
            return
        refused.append((where, why))
    raise StageError(none_loadable(uri, [*skipped, *refused], section))


def fit(cfg: RunConfig, job: TrainingJob, context: RunContext, run_dir: str, callbacks: tuple = ()) -> str:
    """Run the worker loop on Ray Train (in this process: RunContext.in_process) -> the URI of the final checkpoint."""
    if context.in_process:
        import torch

        torch.set_num_threads(cfg.ray.cpus_per_worker)  # what Ray gives a worker of that many CPUs
        forget_ray_train_state(context.run_uri)
        try:
            job.worker_loop({"run": cfg.model_dump(mode="json"), "context": asdict(context)})
        except Exception as err:  # the trial's error line, as from a worker group
            raise StageError(f"training failed: {error_line(err)}") from err
        published = list_checkpoints(context.run_uri)
        if not published:
            raise StageError("training finished without a checkpoint")
        return published[0][0]
    import ray as ray_module

    owns_ray = not ray_module.is_initialized()  # inside a Tune trial Ray is already up and not ours to stop
    worker_log = state_root() / "logs" / f"{run_dir}.log" if owns_ray else None
    if worker_log:
        route_ray_logs(worker_log)
    ray = init_ray(cfg)
    if owns_ray:
        require_gpus(cfg, in_process=False, ray_gpus=ray.cluster_resources().get("GPU", 0))
    if worker_log:
        route_worker_logs(worker_log, state_api=answers_state_api(cfg))
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = storage(cfg)
    trainer = TorchTrainer(
        job.worker_loop,
        train_loop_config={"run": cfg.model_dump(mode="json"), "context": asdict(context)},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=run_dir, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=getattr(cfg, job.section).checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures), callbacks=list(callbacks) or None,
        ),
    )  # fmt: skip
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker failures: one line for the user, the chain under GENFORGE_DEBUG=1
        where = f" (worker logs: {worker_log.relative_to(state_root())})" if worker_log else ""
        raise StageError(f"training failed: {error_line(err)}{where}") from err
    finally:
        if owns_ray:
            ray.shutdown()
    if result.checkpoint is None:
        raise StageError("training finished without a checkpoint")
    # Ray retires only the checkpoints this run reported; older ones written in process stay until here. It keeps the
    # newest by step too, so its list in the run's directory names none of those retired.
    retire_checkpoints(context.run_uri, getattr(cfg, job.section).checkpoints_to_keep)
    if storage_fs:  # pyarrow paths drop the scheme; keep a URI that fsspec can open
        return f"{cfg.ray.storage_path.rstrip('/')}/{run_dir}/{Path(result.checkpoint.path).name}"
    return result.checkpoint.path


def forget_ray_train_state(run_uri: str) -> None:
    """Before a run trains in process: drop the checkpoint list Ray Train keeps in the run's directory
    (checkpoint_manager_snapshot.json) if an earlier Ray Train run of it left one. Training in process
    retires checkpoints itself, and Ray Train, resuming later from a list naming a retired one, would
    refuse the whole directory as corrupted. Without the list it starts its bookkeeping afresh; the
    checkpoints themselves, which every resume reads (CheckpointStore.restore), stay."""
    fs, path = filesystem(run_uri)
    snapshot = f"{path.rstrip('/')}/checkpoint_manager_snapshot.json"
    if fs.exists(snapshot):
        fs.rm(snapshot)


def log_dataset(mlflow, cfg: RunConfig, data_uri: str, data_hash: str) -> None:
    """The prepared data as the run's training input (MLflow's Datasets panel): its location, the content
    hash the checkpoints carry, and the md5 DVC recorded for it in dvc.lock when DVC made it."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways" (all of them the same here)
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(data_uri)
    dataset = MetaDataset(source, name=f"{cfg.data.source}-prepared", digest=data_hash)
    try:
        mlflow.log_input(dataset, context="training")
    except mlflow.exceptions.MlflowException as err:
        # MLflow's SQL store looks the dataset up, then inserts it: two runs of one experiment logging the same dataset
        # at once (a sweep's first trials) can both miss it, and the second insert fails on the unique key. The
        # dataset exists by then, so logging again only links it to this run. (sqlite, PostgreSQL and MySQL say it so.)
        if not any(text in str(err).lower() for text in ("unique constraint failed: datasets", "duplicate key", "duplicate entry")):
            raise
        mlflow.log_input(dataset, context="training")
    md5 = dvc_out_md5(cfg.data.out_dir)
    if md5:
        mlflow.set_tag("data_dvc_md5", md5)


def dvc_out_md5(out_dir: str) -> str | None:
    """The project's dvc.lock md5 of the `prepare` stage output at `out_dir`, or None."""
    import yaml

    try:
        lock = yaml.safe_load(Path("dvc.lock").read_text())
        outs = lock["stages"]["prepare"]["outs"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    wanted = Path(out_dir).resolve()  # an absolute out_dir stays itself
    return next((o.get("md5") for o in outs if Path(o["path"]).resolve() == wanted), None)


# ---------------------------------------------------------------------------
# Exports: what every training stage does with its final checkpoint
# ---------------------------------------------------------------------------


def fetch_checkpoint(checkpoint_uri: str, local: str) -> tuple[dict, dict]:
    """-> (weights: {name: state_dict}, meta) of a checkpoint, downloaded into `local`."""
    download_directory(checkpoint_uri, local)
    return load_checkpoint(local)


def export_provenance(meta: dict, checkpoint_uri: str, context: RunContext) -> dict:
    """What every exported model records about where it came from."""
    return {
        "step": meta["step"], "data_hash": meta["data_hash"], "git_revision": meta["git_revision"],
        "mlflow_run_id": meta["mlflow_run_id"], "checkpoint": portable(checkpoint_uri),
        "class_names": read_manifest(context.data_uri)["class_names"], "config": meta["config"],
    }  # fmt: skip


def publish_export(outputs: ModelOutputs, local: str, run_log: RunLog, write: Callable[[Path], None]) -> None:
    """write(tmp) fills the export directory, which gets the checkpoint's samples.png and replaces
    outputs.out_dir atomically; the loss history goes to outputs.losses_file, the evaluation curve to
    outputs.eval_file (a header only when the run did not evaluate); the checkpoint to MLflow."""
    with atomic_directory(outputs.out_dir) as tmp:
        write(tmp)
        (tmp / "samples.png").write_bytes((Path(local) / "samples.png").read_bytes())
    atomic_write_bytes(outputs.losses_file, (Path(local) / "losses.csv").read_bytes())
    if outputs.eval_file:
        curve = Path(local) / "evaluation.csv"
        atomic_write_bytes(outputs.eval_file, curve.read_bytes() if curve.exists() and curve.stat().st_size else b"step\n")
    run_log.log_artifacts(local, "checkpoint")

