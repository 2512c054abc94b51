"""Stage `train_pix2pix`: image-to-image translation (Pix2Pix, Isola et al. 2017) on Ray Train, with the GAN's
driver and strategies (ray.strategy: ddp | fsdp | deepspeed; G and D are a two-engine pair, pipelines.gan_step).

    python -m pipelines.train_pix2pix [--set pix2pix.total_steps=100]
    dvc repro conditional/dvc.yaml          # this stage, then evaluate and register (not part of the default `dvc repro`)

The pairs come from the prepared data: the input A of image B is its Sobel edge map (pix2pix.condition: edges,
pix2pix.edge_threshold), computed once per worker for the whole train split (deterministic, so every rank and every
resumed run has the same pairs), or, with pix2pix.condition: pairs, the input the user paired with B (an image folder
prepared with data.pairs: folders or side_by_side; refused in one line before Ray starts where the data has none). Checkpoints live in <ray.storage_path>/<pix2pix.run_name>-pix2pix-<config signature>
and resume as the GAN's do. Outputs: <outputs.pix2pix.out_dir>/ (G as safetensors + generator.json with family
pix2pix and how its inputs are made; samples.png: rows of input, translation and target for fixed eval images) and
outputs.pix2pix.losses_file (DVC plots).
"""

from __future__ import annotations

import tempfile

import torch

from gen_core.checkpoint import export_generator
from gen_core.config import RunConfig
from gen_core.data import load_split, read_manifest
from gen_core.pix2pix import (
    UNetGenerator, build_patch_discriminator, generator_spec, pair_inputs, pix2pix_d_loss, pix2pix_g_loss, triplet_grid_png,
)  # fmt: skip
from gen_core.sampling import to_unit
from gen_core.training import batch_indices
from pipelines.common import StageError, absolute, log, run_stage
from pipelines.ray_train import RunContext, RunLog, TrainingJob, export_provenance, fetch_checkpoint, publish_export, train
from pipelines.strategy import Part
from pipelines.worker import start_worker

GRID_IMAGES = 16  # fixed eval images: their edge maps, translations and themselves at every checkpoint


def train_loop_per_worker(worker_config: dict) -> None:
    worker, report, store = start_worker(worker_config)
    cfg, ctx, device, strategy = worker.cfg, worker.ctx, worker.device, worker.strategy
    p = cfg.pix2pix
    amp_dtype = worker.autocast_dtype(p.precision)

    # --- pairs: every rank holds the whole train split's targets (uint8) and inputs; batches are seeded per step
    train, grid = load_split(ctx.data_uri, "train"), load_split(ctx.data_uri, "eval")
    targets, inputs = torch.from_numpy(train.images), pair_inputs(train, p.condition, p.edge_threshold)
    grid_targets, grid_inputs = grid.images[:GRID_IMAGES], pair_inputs(grid, p.condition, p.edge_threshold)[:GRID_IMAGES]

    # --- models and optimizers (same seeded init everywhere), wrapped by the strategy
    spec = generator_spec(p.model, cfg.data.channels, p.condition)
    G, D = wrapped_models(p, spec, cfg.data, strategy, device)
    start_step = store.restore([G, D])
    report.say(
        f"{worker.where} ({torch.get_num_threads()} threads each), {strategy.describe()}, {'bf16' if amp_dtype else 'fp32'}, "
        f"global batch {p.global_batch_size}, steps {start_step}->{p.total_steps}, U-Net G{p.model.g_width}x{p.model.g_levels} "
        f"PatchGAN D{p.model.d_width}, L1 x {p.l1_weight:g}, {len(targets)} {p.condition} pairs"
    )

    for step in range(start_step, p.total_steps):
        index = batch_indices(step, p.global_batch_size, len(targets), p.seed, worker.rank, worker.world_size)
        a, b = inputs[index].to(device), to_unit(targets[index]).to(device)
        losses = pix2pix_step(G, D, a, b, p.l1_weight, lambda: worker.training_compute(amp_dtype))
        values = report.step_done(step + 1, losses)

        if store.due(step + 1):
            with store.writing(step + 1, [G, D], values) as checkpoint:
                G_whole = strategy.gather(G, "model")  # collective; a plain module on rank 0, None elsewhere
                if G_whole is not None:
                    with torch.no_grad(), worker.training_compute(amp_dtype):
                        translated = G_whole(grid_inputs.to(device)).float().cpu()
                    checkpoint.add_sample_grid(triplet_grid_png(grid_inputs, translated, to_unit(torch.from_numpy(grid_targets))))
                    checkpoint.add_weights({"G": G_whole.state_dict()})
                checkpoint.meta["generator_spec"] = spec
    report.finished(p.total_steps - start_step)


def pix2pix_step(G: Part, D: Part, a: torch.Tensor, b: torch.Tensor, l1_weight: float, compute) -> dict[str, torch.Tensor]:
    """One D step and one G step on this rank's pairs (a inputs, b targets, both in [-1, 1]) under any strategy, by
    pipelines.gan_step's rules for a two-engine pair: D's step on G's plain forward under no_grad (nothing of G to sync),
    then G's step through D frozen and called as its plain module (required under DeepSpeed). -> {"d_loss", "g_loss",
    "adversarial", "l1"} (this rank's means). `compute` makes the training forward's context (Worker.training_compute)."""
    with compute():
        d_loss = pix2pix_d_loss(G.module, D.forward, a, b)
    D.backward(d_loss)
    D.step()
    with D.frozen() as frozen_D, compute():
        g_loss, parts = pix2pix_g_loss(G.forward, frozen_D, a, b, l1_weight)
    G.backward(g_loss)
    G.step()
    return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), **parts}


def wrapped_models(p, spec: dict, data, strategy, device):
    """-> (G, D) as the strategy's Parts with Adam(lr, (beta1, beta2)) each. No channels_last: the U-Net's
    InstanceNorm and skip concatenations gain nothing from it (measured for the GroupNorm models, see train_gan)."""
    torch.manual_seed(p.seed)
    G = UNetGenerator(**spec).to(device)
    D = build_patch_discriminator(spec["in_channels"], data.channels, data.resolution, p.model.d_width).to(device)
    betas = (p.adam_beta1, p.adam_beta2)
    G = strategy.wrap("G", G, lambda params: torch.optim.Adam(params, lr=p.lr_g, betas=betas))
    D = strategy.wrap("D", D, lambda params: torch.optim.Adam(params, lr=p.lr_d, betas=betas))
    return G, D


def training_job(cfg: RunConfig) -> TrainingJob:
    return TrainingJob(stage="train_pix2pix", kind="pix2pix", section="pix2pix", worker_loop=train_loop_per_worker, export=export)


def export(cfg: RunConfig, checkpoint_uri: str, context: RunContext, run_log: RunLog) -> dict:
    """G -> <outputs.pix2pix.out_dir> (safetensors + generator.json), loss history -> DVC plots, checkpoint -> MLflow."""
    p = cfg.pix2pix
    with tempfile.TemporaryDirectory() as local:
        weights, meta = fetch_checkpoint(checkpoint_uri, local)
        export_meta = {
            "family": "pix2pix", "generator_spec": meta["generator_spec"], "condition": p.condition, "edge_threshold": p.edge_threshold,
            "resolution": cfg.data.resolution, "channels": cfg.data.channels, **export_provenance(meta, checkpoint_uri, context),
        }  # fmt: skip
        publish_export(cfg.outputs.pix2pix, local, run_log, lambda tmp: export_generator(tmp, weights["G"], export_meta))
    log("train_pix2pix").info("exported G at step %d -> %s", meta["step"], cfg.outputs.pix2pix.out_dir)
    return export_meta


def check_pairs(cfg: RunConfig) -> None:
    """pix2pix.condition pairs needs prepared data with user pairs: one line before Ray starts, not a failed worker."""
    if cfg.pix2pix.condition == "pairs" and read_manifest(absolute(cfg.data.out_dir)).get("pairs", "none") == "none":
        raise StageError(f"pix2pix.condition pairs: {cfg.data.out_dir} has no pairs (prepare an image_folder with data.pairs folders or side_by_side)")


def main() -> None:
    def run(cfg: RunConfig, args) -> None:
        check_pairs(cfg)
        train(cfg, training_job(cfg))

    run_stage("train_pix2pix", run)


if __name__ == "__main__":
    main()
