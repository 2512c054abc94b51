"""The latent-diffusion family's files: the exported autoencoder and the cached latents tied to it.

- An exported autoencoder is a diffusers `AutoencoderKL` directory whose config holds
  `scaling_factor` = 1 / std of the train split's latents (as Stable Diffusion does).
  `autoencoder_digest` (sha256 of its weights) is what latents and denoisers are tied to.
- Cached latents: <dir>/latents.safetensors (posterior means, unscaled, (N, c, r, r) float32, plus
  labels) and latents.json, which records the autoencoder's digest, latent channels and scale.
  `load_latents` refuses latents whose record does not match the autoencoder it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from gen_core.errors import CheckpointError, LatentMismatchError
from gen_core.io import atomic_directory, sha256_file
from gen_core.sampling import image_grid, png_bytes, to_uint8, to_unit

AUTOENCODER_WEIGHTS = "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------
# The exported autoencoder
# ---------------------------------------------------------------------------


def autoencoder_digest(directory: str | Path) -> str:
    """sha256 of the exported autoencoder weights: what latents and denoisers are tied to."""
    path = Path(directory) / AUTOENCODER_WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{directory}: no trained autoencoder (run the train_autoencoder stage first)")
    return sha256_file(path)


# How every exported diffusers model is read: safetensors only (no pickle), and the plain loader. diffusers' default,
# low_cpu_mem_usage, needs `accelerate` (not a dependency) and without it prints a four-line notice on every load.
PRETRAINED = {"use_safetensors": True, "low_cpu_mem_usage": False}


def load_autoencoder(directory: str | Path) -> AutoencoderKL:
    autoencoder_digest(directory)  # one-line error when it is missing
    return AutoencoderKL.from_pretrained(directory, **PRETRAINED).eval()


def autoencoder_record(directory: str | Path) -> dict:
    """What a denoiser is tied to: the autoencoder's weights, latent channels and scale."""
    sha256 = autoencoder_digest(directory)
    config = json.loads((Path(directory) / "config.json").read_text())
    return {"sha256": sha256, "latent_channels": config["latent_channels"], "scaling_factor": config["scaling_factor"]}


@torch.no_grad()
def reconstruct(vae, images_uint8: torch.Tensor, batch_size: int = 250, device="cpu") -> torch.Tensor:
    """Deterministic round trip through the posterior mean: uint8 (N, C, H, W) -> float in [-1, 1]."""
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
# Cached latents
# ---------------------------------------------------------------------------


def save_latents(out_dir: str | Path, latents: torch.Tensor, labels: torch.Tensor, record: dict) -> None:
    with atomic_directory(out_dir) as tmp:
        save_file({"latents": latents.contiguous(), "labels": labels.long()}, str(tmp / "latents.safetensors"))
        (tmp / "latents.json").write_text(json.dumps(record, indent=2) + "\n")


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
