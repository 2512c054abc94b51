"""Stage `encode_latents`: the train split through the autoencoder, once, cached as a DVC output.

    python -m pipelines.encode_latents

Writes <latents.out_dir>/latents.safetensors (posterior means, unscaled, (N, c, r, r) float32,
plus labels) and latents.json, which ties them to the autoencoder: its weights' sha256, latent
channels and scaling factor. train_ldm refuses latents whose record does not match the
autoencoder it is given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from gen_core.config import RunConfig
from gen_core.data import dataset_hash, load_split
from gen_core.checkpoint import LatentMismatchError
from gen_core.io import atomic_directory
from gen_core.sampling import to_unit
from pipelines.common import absolute, format_duration, log, run_stage
from pipelines.train_autoencoder import autoencoder_digest


def load_autoencoder(directory: str | Path) -> AutoencoderKL:
    autoencoder_digest(directory)  # one-line error when it is missing
    return AutoencoderKL.from_pretrained(directory, use_safetensors=True).eval()


@torch.no_grad()
def run(cfg: RunConfig) -> dict:
    logger = log("encode_latents")
    vae = load_autoencoder(cfg.autoencoder.out_dir)
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
        "autoencoder_sha256": autoencoder_digest(cfg.autoencoder.out_dir), "latent_channels": vae.config.latent_channels,
        "scaling_factor": vae.config.scaling_factor, "count": len(latents), "shape": list(latents.shape[1:]),
        "data_hash": dataset_hash(absolute(cfg.data.out_dir)),
    }  # fmt: skip
    with atomic_directory(cfg.latents.out_dir) as tmp:
        save_file({"latents": latents.contiguous(), "labels": torch.from_numpy(split.labels).long()}, str(tmp / "latents.safetensors"))
        (tmp / "latents.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("%d latents %s -> %s", len(latents), tuple(latents.shape[1:]), cfg.latents.out_dir)
    return record


def load_latents(directory: str | Path, autoencoder_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """-> (scaled latents (N, c, r, r), labels (N,), record), after checking they belong to the autoencoder."""
    directory = Path(directory)
    try:
        record = json.loads((directory / "latents.json").read_text())
        tensors = load_file(str(directory / "latents.safetensors"))
    except FileNotFoundError:
        raise LatentMismatchError(f"{directory}: no cached latents (run the encode_latents stage first)") from None
    vae_config = json.loads((Path(autoencoder_dir) / "config.json").read_text())
    check_latents(record, tensors["latents"], vae_config, autoencoder_digest(autoencoder_dir), str(directory))
    return tensors["latents"] * record["scaling_factor"], tensors["labels"], record


def check_latents(record: dict, latents: torch.Tensor, vae_config: dict, vae_sha256: str, where: str) -> None:
    if latents.shape[1] != vae_config["latent_channels"] or record["latent_channels"] != vae_config["latent_channels"]:
        raise LatentMismatchError(
            f"{where}: latents have {latents.shape[1]} channels, autoencoder has {vae_config['latent_channels']}; rerun encode_latents"
        )
    if abs(record["scaling_factor"] - vae_config["scaling_factor"]) > 1e-6 * abs(vae_config["scaling_factor"]):
        raise LatentMismatchError(
            f"{where}: latents were scaled by {record['scaling_factor']:.6g}, autoencoder uses {vae_config['scaling_factor']:.6g}; rerun encode_latents"
        )
    if record["autoencoder_sha256"] != vae_sha256:
        raise LatentMismatchError(f"{where}: latents come from a different autoencoder (weights sha256 differs); rerun encode_latents")


def main() -> None:
    run_stage("encode_latents", lambda cfg, args: run(cfg) and None)


if __name__ == "__main__":
    main()
