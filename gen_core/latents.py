"""The latent-diffusion family's files: the exported autoencoder and the cached latents tied to it.

- An exported autoencoder is a diffusers `AutoencoderKL` directory whose config says how its latents are normalised for
  the denoiser (gen_core.diffusers_pipeline.to_denoiser_latents): `scaling_factor` = 1 / std of the train split's latents
  (one scale, as Stable Diffusion does), or, with `autoencoder.latent_normalisation: per_channel`, `latents_mean` and
  `latents_std` per channel (diffusers' names, as SDXL-derived models carry them) and `scaling_factor` 1.
  `autoencoder_digest` (sha256 of its weights) is what latents and denoisers are tied to.
- Cached latents: <dir>/latents.safetensors (posterior means, unscaled, (N, c, r, r) float32, plus
  labels) and latents.json, which records the autoencoder's digest, latent channels and normalisation.
  `load_latents` refuses latents whose record does not match the autoencoder it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from gen_core.diffusers_pipeline import to_denoiser_latents
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


NORMALISATION_KEYS = ("scaling_factor", "latents_mean", "latents_std")  # an AutoencoderKL config's; the last two only per channel


def normalisation(vae_config) -> dict:
    """The config's entries that normalise latents for the denoiser; the per-channel ones only when set (so records of
    autoencoders with one scale read as they did before the choice existed)."""
    return {key: vae_config[key] for key in NORMALISATION_KEYS if vae_config.get(key) is not None}


def autoencoder_record(directory: str | Path) -> dict:
    """What a denoiser is tied to: the autoencoder's weights, latent channels and latent normalisation."""
    sha256 = autoencoder_digest(directory)
    config = json.loads((Path(directory) / "config.json").read_text())
    return {"sha256": sha256, "latent_channels": config["latent_channels"], **normalisation(config)}


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
def latent_normalisation(vae, images_uint8: torch.Tensor, per_channel: bool = False, batch_size: int = 500) -> dict:
    """How the posterior means of `images_uint8` reach zero mean, unit variance for the denoiser -> the config entries
    (`to_denoiser_latents`): {"scaling_factor": 1/std} over all channels (SD's 0.18215), or per channel
    {"scaling_factor": 1, "latents_mean": [...], "latents_std": [...]}."""
    latents = torch.cat([vae.encode(to_unit(images_uint8[s : s + batch_size])).latent_dist.mode() for s in range(0, len(images_uint8), batch_size)])
    latents = latents.float()
    if not per_channel:
        return {"scaling_factor": 1.0 / float(latents.std())}
    return {"scaling_factor": 1.0, "latents_mean": latents.mean(dim=(0, 2, 3)).tolist(), "latents_std": latents.std(dim=(0, 2, 3)).tolist()}


# ---------------------------------------------------------------------------
# Cached latents
# ---------------------------------------------------------------------------


def save_latents(out_dir: str | Path, latents: torch.Tensor, labels: torch.Tensor, record: dict) -> None:
    with atomic_directory(out_dir) as tmp:
        save_file({"latents": latents.contiguous(), "labels": labels.long()}, str(tmp / "latents.safetensors"))
        (tmp / "latents.json").write_text(json.dumps(record, indent=2) + "\n")


def load_latents(directory: str | Path, autoencoder_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """-> (normalised latents (N, c, r, r), labels (N,), record), after checking they belong to the autoencoder."""
    directory = Path(directory)
    try:
        record = json.loads((directory / "latents.json").read_text())
        tensors = load_file(str(directory / "latents.safetensors"))
    except FileNotFoundError:
        raise LatentMismatchError(f"{directory}: no cached latents (run the encode_latents stage first)") from None
    vae_config = json.loads((Path(autoencoder_dir) / "config.json").read_text())
    check_latents(record, tensors["latents"], vae_config, autoencoder_digest(autoencoder_dir), str(directory))
    return to_denoiser_latents(tensors["latents"], vae_config), tensors["labels"], record


def _values(statistics) -> list[float] | None:
    return None if statistics is None else [float(v) for v in statistics]


def check_latents(record: dict, latents: torch.Tensor, vae_config: dict, vae_sha256: str, where: str) -> None:
    if latents.shape[1] != vae_config["latent_channels"] or record["latent_channels"] != vae_config["latent_channels"]:
        raise LatentMismatchError(
            f"{where}: latents have {latents.shape[1]} channels, autoencoder has {vae_config['latent_channels']}; rerun encode_latents"
        )
    if abs(record["scaling_factor"] - vae_config["scaling_factor"]) > 1e-6 * abs(vae_config["scaling_factor"]):
        raise LatentMismatchError(
            f"{where}: latents were scaled by {record['scaling_factor']:.6g}, autoencoder uses {vae_config['scaling_factor']:.6g}; rerun encode_latents"
        )
    if any(_values(record.get(key)) != _values(vae_config.get(key)) for key in NORMALISATION_KEYS[1:]):
        raise LatentMismatchError(f"{where}: latents were recorded with other per-channel statistics (latents_mean, latents_std) "
                                  "than the autoencoder's; rerun encode_latents")  # fmt: skip
    if record["autoencoder_sha256"] != vae_sha256:
        raise LatentMismatchError(f"{where}: latents come from a different autoencoder (weights sha256 differs); rerun encode_latents")
