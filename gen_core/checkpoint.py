"""Checkpoints: state_dicts plus JSON metadata. Loaded with weights_only=True; no pickled code ever.

A training checkpoint directory holds:
    state.pt       G, D, EMA, both optimizers, step, RNG state (tensors and plain containers only)
    meta.json      resolved config, specs, git revision, data hash, step
    losses.csv     the loss history up to this step (for DVC plots)
Exported generators are `generator.safetensors` + `generator.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gen_core.io import atomic_write_bytes, atomic_write_json


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the current run."""


class LatentMismatchError(CheckpointError):
    """Latents, denoiser and autoencoder that do not belong together (channels, scale, weights)."""


def save_training_state(directory: str | Path, state: dict, meta: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "state.pt")
    atomic_write_json(directory / "meta.json", meta)


def load_training_state(directory: str | Path) -> tuple[dict, dict]:
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{directory}: incomplete checkpoint ({Path(err.filename).name} missing)") from None
    except Exception as err:  # corrupt zip / unpickling refused
        raise CheckpointError(f"{directory}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    return state, meta


def export_generator(directory: str | Path, state_dict: dict, meta: dict) -> None:
    """Write generator.safetensors + generator.json (spec, metrics, provenance)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    tmp = directory / ".generator.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(directory / "generator.safetensors")
    atomic_write_json(directory / "generator.json", meta)


def load_generator(directory: str | Path):
    """-> (Generator in eval mode, meta) from generator.safetensors + generator.json."""
    from gen_core.models import Generator, GeneratorSpec

    state, meta = load_generator_export(directory)
    generator = Generator(GeneratorSpec(**meta["generator_spec"]))
    generator.load_state_dict(state)
    return generator.eval(), meta


def load_generator_export(directory: str | Path) -> tuple[dict, dict]:
    directory = Path(directory)
    try:
        meta = json.loads((directory / "generator.json").read_text())
        return load_file(str(directory / "generator.safetensors")), meta
    except FileNotFoundError as err:
        raise CheckpointError(f"{directory}: no exported generator ({Path(err.filename).name} missing)") from None


