"""Stage `train_gan`: a class-conditional GAN (gan.model.arch: dcgan | resnet; recipes in the README) on Ray Train (ray.strategy: ddp | fsdp | deepspeed; gloo on CPU, nccl on GPU).

    python -m pipelines.train_gan [--params params.yaml] [--set gan.total_steps=100]
    ray job submit --working-dir . -- python -m pipelines.train_gan --set data.out_dir=/abs/path

Checkpoints live in <ray.storage_path>/<gan.run_name>-gan-<config signature> (pipelines.ray_train).
A rerun with the same model/optimizer config resumes from the latest checkpoint there (the step
count continues, also when total_steps grew); a changed config trains afresh in its own directory.
Outputs: <outputs.gan.out_dir>/ (EMA generator as safetensors + generator.json + samples.png) and
outputs.gan.losses_file (DVC plots).
"""

from __future__ import annotations

import tempfile

import torch

from gen_core.checkpoint import export_generator
from gen_core.config import RunConfig
from gen_core.data import load_split
from gen_core.generators import GanGenerator
from gen_core.losses import gan_objective
from gen_core.models import build_discriminator, build_generator, ema_beta, gan_specs, recalibrate_batchnorm
from gen_core.sampling import class_grid_png, to_unit
from gen_core.training import batch_indices, ramp, step_generator
from pipelines.common import log, run_stage
from pipelines.gan_step import gan_step
from pipelines.probe import checkpoint_evaluator
from pipelines.ray_train import RunContext, RunLog, TrainingJob, export_provenance, fetch_checkpoint, publish_export, train
from pipelines.worker import start_worker


# ---------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)
# ---------------------------------------------------------------------------


def train_loop_per_worker(worker_config: dict) -> None:
    worker, report, store = start_worker(worker_config)
    cfg, ctx, device, strategy = worker.cfg, worker.ctx, worker.device, worker.strategy
    t = cfg.gan
    amp_dtype = worker.autocast_dtype(t.precision)

    # --- data: every rank holds the (small, uint8) train split; batches are seeded per step
    split = load_split(ctx.data_uri, "train")
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)

    # --- models and optimizers (same seeded init everywhere), wrapped by the strategy
    g_spec, d_spec = gan_specs(t.model, cfg.data.resolution, cfg.data.channels, ctx.num_classes)
    G, D, objective, lr_d = wrapped_models(t, g_spec, d_spec, strategy, device)
    start_step = store.restore([G, D])
    evaluate = checkpoint_evaluator(worker, report, store)
    report.say(
        f"{worker.where} ({torch.get_num_threads()} threads each), {strategy.describe()}, "
        f"{'bf16' if amp_dtype else 'fp32'}, global batch {t.global_batch_size}, steps {start_step}->{t.total_steps}, "
        f"{describe_recipe(t)}"
    )
    penalties: dict[str, torch.Tensor] = {}  # the latest values of the (lazy) penalties, for the log

    for step in range(start_step, t.total_steps):
        # --- D and G steps on this rank's share of the global batch
        noise = step_generator(t.seed, step, worker.rank)
        index = batch_indices(step, t.global_batch_size, len(labels), t.seed, worker.rank, worker.world_size)
        real, y = to_unit(images[index]).to(device), labels[index].to(device)
        # the config's rates (a PBT hand-off resumes another trial's state with new ones), on the schedule's ramp
        lr_ramp = ramp(t.schedule.lr_start_ratio, step * t.global_batch_size, t.schedule.ramp_kimg)
        G.set_learning_rate(t.lr_g * lr_ramp)
        D.set_learning_rate(lr_d * lr_ramp)
        gamma_scale = ramp(t.schedule.gamma_start_ratio, step * t.global_batch_size, t.schedule.ramp_kimg)
        losses = gan_step(G, D, real, y, noise, g_spec.z_dim, objective, t.d_steps_per_g_step, lambda: worker.training_compute(amp_dtype),
                          step, gamma_scale)  # fmt: skip
        penalties.update((k, losses.pop(k)) for k in ("r1", "r2", "gp") if k in losses)
        losses.update(penalties)

        # --- EMA of G, in G's own layout (sharded under FSDP)
        strategy.update_ema(G, ema_beta(t.global_batch_size, (step + 1) * t.global_batch_size, t.ema_halflife_kimg, t.ema_rampup_ratio))

        # --- log (every rank joins the loss reduce)
        values = report.step_done(step + 1, losses)

        # --- checkpoint, with the EMA generator's sample grid and evaluation (collective)
        if store.due(step + 1):
            with store.writing(step + 1, [G, D], values) as checkpoint:
                G_ema = strategy.gather(G, "ema")  # collective; a plain module on rank 0, None elsewhere
                if G_ema is not None:
                    recalibrate_batchnorm(G_ema, seed=t.seed)  # standing stats for the EMA weights
                    checkpoint.add_sample_grid(class_grid_png(GanGenerator(G_ema), t.sample_grid_seed, device))
                    checkpoint.add_weights({"G_ema": G_ema.state_dict()})
                if evaluate and evaluate.due(step + 1):
                    generator = GanGenerator(G_ema) if G_ema is not None else None
                    checkpoint.add_evaluation(evaluate(step + 1, generator, amp_dtype))  # collective: samples on every rank
                checkpoint.meta["generator_spec"] = g_spec.to_dict()
        if evaluate and evaluate.stop:  # `patience` evaluations without improvement
            break
    report.finished((step + 1 if evaluate and evaluate.stop else t.total_steps) - start_step)


def wrapped_models(t, g_spec, d_spec, strategy, device):
    """-> (G, D) as the strategy's Parts with their Adam optimizers, the objective, D's base learning rate."""
    torch.manual_seed(t.seed)
    # channels_last: the bf16 conv kernels (oneDNN/AMX on CPU, tensor cores on GPU) prefer NHWC; measured
    # 1.2x on the D+G step here (benchmarks/gan_throughput.py --layouts channels_last,contiguous). Not for the diffusers models,
    # where GroupNorm made it 0.8x. DDP only: FSDP2 refuses non-contiguous parameters and ZeRO flattens them.
    layout = torch.channels_last if strategy.name == "ddp" else torch.contiguous_format
    G = build_generator(g_spec).to(device, memory_format=layout)
    D = build_discriminator(d_spec).to(device, memory_format=layout)
    objective = gan_objective(t)
    c = objective.d_optimizer_scale  # lazy regularisation: D's rate and betas scaled by k/(k+1) (StyleGAN2)
    lr_d, betas = t.lr_d * c, (t.adam_beta1, t.adam_beta2)
    G = strategy.wrap("G", G, lambda params: torch.optim.Adam(params, lr=t.lr_g, betas=betas), ema=True)
    D = strategy.wrap("D", D, lambda params: torch.optim.Adam(params, lr=lr_d, betas=(betas[0] ** c, betas[1] ** c)))
    return G, D, objective, lr_d


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def describe_recipe(t) -> str:
    """One line for the log: networks, loss, penalties, augmentation."""
    r, m = t.regularization, t.model
    parts = [f"{m.arch} G{m.g_width}/D{m.d_width}" + (f" mbstd{m.mbstd_group}" if m.mbstd_group else ""), t.loss]
    parts += [f"{name} {value:g}" for name, value in (("r1", r.r1_gamma), ("r2", r.r2_gamma), ("gp", r.gp_lambda)) if value]
    if t.penalised and r.interval > 1:
        parts.append(f"every {r.interval} D steps")
    if t.augment:
        parts.append("DiffAugment " + ",".join(t.augment))
    return " ".join(parts)


def training_job(cfg: RunConfig) -> TrainingJob:
    return TrainingJob(stage="train_gan", kind="gan", section="gan", worker_loop=train_loop_per_worker, export=export)


def export(cfg: RunConfig, checkpoint_uri: str, context: RunContext, run_log: RunLog) -> dict:
    """EMA generator -> <outputs.gan.out_dir> (safetensors), loss history -> DVC plots, checkpoint -> MLflow."""
    with tempfile.TemporaryDirectory() as local:
        weights, meta = fetch_checkpoint(checkpoint_uri, local)
        export_meta = {"family": "gan", "generator_spec": meta["generator_spec"], **export_provenance(meta, checkpoint_uri, context)}
        publish_export(cfg.outputs.gan, local, run_log, lambda tmp: export_generator(tmp, weights["G_ema"], export_meta))
    log("train_gan").info("exported EMA generator at step %d -> %s", meta["step"], cfg.outputs.gan.out_dir)
    return export_meta


def main() -> None:
    run_stage("train_gan", lambda cfg, args: train(cfg, training_job(cfg)) and None)


if __name__ == "__main__":
    main()
