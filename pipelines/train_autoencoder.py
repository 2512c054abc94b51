"""Stage `train_autoencoder`: the KL autoencoder of the latent-diffusion family, on Ray Train.

    python -m pipelines.train_autoencoder [--set autoencoder.total_steps=100]

Same driver as the GAN (pipelines.ray_train): ray.strategy workers, resume from storage, MLflow run.
Outputs:
  <autoencoder.out_dir>/     AutoencoderKL in diffusers format; its config's `scaling_factor` is
                             1 / std of the train split's latents, measured after training
                             autoencoder.json: provenance + metrics; samples.png: eval images over
                             their reconstructions
  autoencoder.metrics_file   reconstruction PSNR (dB) and FID of the eval split (DVC metrics)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from gen_core.checkpoint import save_weights
from gen_core.config import RunConfig
from gen_core.data import load_split
from gen_core.diffusion import AutoencoderRoundTrip, autoencoder_loss, build_autoencoder, psnr
from gen_core.io import atomic_write_json, sha256_file
from gen_core.metrics import fid_from_stats, inception_path, load_inception, load_ref_stats
from gen_core.sampling import image_grid, to_uint8, to_unit
from gen_core.training import batch_indices, step_generator
from pipelines.common import StageError, log, run_stage
from pipelines.ray_train import (
    LoopContext, TrainingJob, WorkerSession, export_provenance, fetch_checkpoint, publish_export, train,
)
from pipelines.train_gan import png_bytes

GRID_IMAGES = 32  # fixed eval images shown over their reconstructions


def resume_signature(cfg: RunConfig) -> dict:
    a = cfg.autoencoder
    keys = ("downsample_factor", "latent_channels", "width", "layers_per_block", "reconstruction_loss", "kl_weight", "lr",
            "global_batch_size", "seed")  # fmt: skip
    return {**{k: getattr(a, k) for k in keys}, "resolution": cfg.data.resolution, "channels": cfg.data.channels}


@torch.no_grad()
def reconstruct(vae, images_uint8: torch.Tensor, batch_size: int = 250, device="cpu") -> torch.Tensor:
    """Deterministic round trip through the posterior mean: uint8 -> float in [-1, 1]."""
    out = []
    for start in range(0, len(images_uint8), batch_size):
        x = to_unit(images_uint8[start : start + batch_size]).to(device)
        out.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def reconstruction_grid_png(vae, images_uint8: torch.Tensor) -> bytes:
    """Row pairs: originals, then their reconstructions."""
    device = next(vae.parameters()).device
    recon = to_uint8(reconstruct(vae, images_uint8, device=device))
    rows = []
    for start in range(0, len(images_uint8), 8):
        rows += [images_uint8[start : start + 8], recon[start : start + 8]]
    return png_bytes(image_grid(torch.cat(rows), rows=len(rows)))


@torch.no_grad()
def latent_std(vae, images_uint8: torch.Tensor, batch_size: int = 500) -> float:
    """Std of the posterior means over `images_uint8`: 1/std scales latents to unit variance (SD's 0.18215)."""
    latents = torch.cat([vae.encode(to_unit(images_uint8[s : s + batch_size])).latent_dist.mode() for s in range(0, len(images_uint8), batch_size)])
    return float(latents.float().std())


# ---------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)
# ---------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    session = WorkerSession(loop_config)
    cfg, ctx, device, strategy = session.cfg, session.ctx, session.device, session.strategy
    a = cfg.autoencoder
    amp_dtype = session.autocast_dtype(a.precision)

    # --- data
    split = load_split(ctx.data_uri, "train")
    images = torch.from_numpy(split.images)
    grid_images = torch.from_numpy(load_split(ctx.data_uri, "eval").images[:GRID_IMAGES])

    # --- model and optimizer, wrapped by the strategy (the round trip is one forward: encode, sample, decode)
    torch.manual_seed(a.seed)
    vae = build_autoencoder(a, cfg.data.channels).to(device)
    model = strategy.wrap("vae", AutoencoderRoundTrip(vae), lambda params: torch.optim.Adam(params, lr=a.lr))
    start_step = session.restore([model])
    model.set_learning_rate(a.lr)
    session.say(
        f"{session.where}, {strategy.describe()}, {'bf16' if amp_dtype else 'fp32'}, "
        f"f={a.downsample_factor} latents {a.latent_channels}x{cfg.data.resolution // a.downsample_factor}^2, "
        f"global batch {a.global_batch_size}, steps {start_step}->{a.total_steps}"
    )

    def build_checkpoint(directory: Path, step: int) -> dict:
        whole = strategy.gather(model, "model")  # collective
        if session.rank == 0:
            whole.eval()
            (directory / "samples.png").write_bytes(reconstruction_grid_png(whole.vae, grid_images))
            save_weights(directory, {"vae": whole.vae.state_dict()})
            whole.train(whole is model.module)  # the live model goes back to training
        return {"autoencoder": a.model_dump(mode="json")}

    for step in range(start_step, a.total_steps):
        # --- reconstruction + KL step
        noise = step_generator(a.seed, step, session.rank)
        index = batch_indices(step, a.global_batch_size, len(images), a.seed, session.rank, session.world_size)
        x = to_unit(images[index]).to(device)
        with session.autocast(amp_dtype):
            loss, _ = autoencoder_loss(model.train, x, a.reconstruction_loss, a.kl_weight, noise)
            loss = loss.mean()
        model.backward(loss)
        model.step()

        # --- loss check, logging, checkpoint (collective)
        session.end_step(step + 1, a, {"loss": loss}, [model], build_checkpoint)
    session.finished(a.total_steps - start_step)


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run(cfg: RunConfig) -> dict:
    job = TrainingJob(
        stage="train_autoencoder", family="autoencoder", section="autoencoder", loop=train_loop_per_worker,
        signature=resume_signature(cfg), export=_export,
    )  # fmt: skip
    return train(cfg, job)


def _export(cfg: RunConfig, checkpoint_uri: str, context: LoopContext, mlflow) -> dict:
    """Measure the latent scale and the reconstruction metrics, then write the diffusers-format model."""
    logger = log("train_autoencoder")
    a = cfg.autoencoder
    with tempfile.TemporaryDirectory() as local:
        weights, meta = fetch_checkpoint(checkpoint_uri, local)
        vae = build_autoencoder(a, cfg.data.channels)
        vae.load_state_dict(weights["vae"])
        vae.eval()
        train_images = torch.from_numpy(load_split(context.data_uri, "train").images[:10_000])
        scaling_factor = 1.0 / latent_std(vae, train_images)
        vae.register_to_config(scaling_factor=scaling_factor)

        evals = torch.from_numpy(load_split(context.data_uri, "eval").images)
        reconstruction = reconstruct(vae, evals)
        metrics = {"psnr_db": float(psnr(to_unit(evals), reconstruction).mean()), "scaling_factor": scaling_factor, "step": meta["step"]}
        metrics.update(reconstruction_fid(cfg, to_uint8(reconstruction[: a.rfid_images]), logger))
        logger.info("reconstruction psnr %.2f dB, fid %.2f, latent scale %.4f", metrics["psnr_db"], metrics["fid"], scaling_factor)

        export_meta = {"family": "autoencoder", "metrics": metrics, **export_provenance(meta, checkpoint_uri, context)}

        def write(tmp: Path) -> None:
            vae.save_pretrained(tmp, safe_serialization=True)
            atomic_write_json(tmp / "autoencoder.json", export_meta)

        publish_export(a, local, mlflow, write)
        atomic_write_json(a.metrics_file, metrics)
        mlflow.log_metrics({f"recon_{k}": float(v) for k, v in metrics.items() if k != "step"}, step=meta["step"])
    logger.info("exported autoencoder at step %d -> %s", meta["step"], a.out_dir)
    return export_meta


def reconstruction_fid(cfg: RunConfig, reconstruction_uint8: torch.Tensor, logger) -> dict:
    """Inception FID of (the first autoencoder.rfid_images of) the eval split's reconstructions against the whole
    eval split (ref_stats). Fewer images bias it upwards: compare it only at the same setting."""
    from pipelines.ref_stats import inception_stats

    reference = load_ref_stats(f"{cfg.ref_stats.out_dir}/inception.npz")
    _, feature_sha256 = inception_path(cfg.ref_stats.inception)
    if reference["feature_sha256"] != feature_sha256:
        raise StageError(f"{cfg.ref_stats.out_dir}/inception.npz: made with a different Inception network; rerun ref_stats")
    net = load_inception(cfg.ref_stats.inception)
    stats, _ = inception_stats(net, reconstruction_uint8, cfg.ref_stats.inception.batch_size, logger)
    return {"fid": fid_from_stats(stats.mu, stats.sigma, reference["mu"], reference["sigma"]), "fid_images": len(reconstruction_uint8)}


def autoencoder_digest(directory: str | Path) -> str:
    """sha256 of the exported autoencoder weights: what latents and denoisers are tied to."""
    path = Path(directory) / "diffusion_pytorch_model.safetensors"
    if not path.exists():
        raise StageError(f"{directory}: no trained autoencoder (run the train_autoencoder stage first)")
    return sha256_file(path)


def main() -> None:
    run_stage("train_autoencoder", lambda cfg, args: run(cfg) and None)


if __name__ == "__main__":
    main()
