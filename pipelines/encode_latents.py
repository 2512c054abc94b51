"""Stage `encode_latents`: the train split through the autoencoder, once, cached as a DVC output.

    python -m pipelines.encode_latents

Writes <latents.out_dir>/latents.safetensors (posterior means, unscaled, (N, c, r, r) float32,
plus labels) and latents.json, which ties them to the autoencoder: its weights' sha256, latent
channels and latent normalisation (gen_core.latents). train_ldm refuses latents whose record does not
match the autoencoder it is given.
"""

from __future__ import annotations

import time

import torch

from gen_core.config import RunConfig
from gen_core.data import dataset_hash, load_split
from gen_core.latents import autoencoder_digest, load_autoencoder, normalisation, save_latents
from gen_core.sampling import to_unit
from pipelines.common import absolute, format_duration, log, run_stage


@torch.no_grad()
def run(cfg: RunConfig) -> dict:
    logger = log("encode_latents")
    vae = load_autoencoder(cfg.outputs.autoencoder.out_dir)
    split = load_split(absolute(cfg.data.out_dir), "train")
    images, batch = torch.from_numpy(split.images), cfg.latents.batch_size
    started, latents = time.monotonic(), []
    for start in range(0, len(images), batch):
        latents.append(vae.encode(to_unit(images[start : start + batch])).latent_dist.mode().float())
        done = min(start + batch, len(images))
        if done == len(images) or len(latents) % 10 == 0:
            rate = done / (time.monotonic() - started)
            logger.info("encoded %d/%d images, %.0f img/s, eta %s", done, len(images), rate, format_duration((len(images) - done) / rate))
    latents = torch.cat(latents)
    record = {
        "autoencoder_sha256": autoencoder_digest(cfg.outputs.autoencoder.out_dir), "latent_channels": vae.config.latent_channels,
        **normalisation(vae.config), "count": len(latents), "shape": list(latents.shape[1:]),
        "data_hash": dataset_hash(absolute(cfg.data.out_dir)),
    }  # fmt: skip
    save_latents(cfg.latents.out_dir, latents, torch.from_numpy(split.labels), record)
    logger.info("%d latents %s -> %s", len(latents), tuple(latents.shape[1:]), cfg.latents.out_dir)
    return record


def main() -> None:
    run_stage("encode_latents", lambda cfg, args: run(cfg) and None)


if __name__ == "__main__":
    main()
