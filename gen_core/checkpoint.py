"""Checkpoints: JSON metadata, weights as safetensors, training state loaded with weights_only=True.
No pickled code is ever loaded.

A training checkpoint directory holds:
    meta.json           resolved config, specs, step, strategy, world size, git revision, data hash,
                        and `files`: every file of every rank with its size (complete iff all present)
    weights.safetensors the weights an export needs (EMA generator, autoencoder, EMA denoiser)
    losses.csv          the loss history up to this step (for DVC plots)
    samples.png         the sample grid at this step
    + the training state in the strategy's own form (pipelines.strategy): state.pt (ddp),
      fsdp/ (torch.distributed.checkpoint shards), deepspeed/ (ZeRO partitions); rng/rank_NNN.pt per rank
Exported generators are `generator.safetensors` + `generator.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gen_core.errors import CheckpointError
from gen_core.io import atomic_write_json


def save_weights(directory: str | Path, state_dicts: dict[str, dict]) -> None:
    """{"G_ema": state_dict, ...} -> weights.safetensors (keys "G_ema/<param>")."""
    tensors = {f"{name}/{key}": value.detach().cpu().contiguous().clone() for name, sd in state_dicts.items() for key, value in sd.items()}
    save_file(tensors, str(Path(directory) / "weights.safetensors"))


def load_weights(directory: str | Path) -> dict[str, dict]:
    directory = Path(directory)
    if not (directory / "weights.safetensors").exists() and (directory / "state.pt").exists():
        # checkpoints written before the strategies (ddp only) kept the export weights in state.pt
        return {name: value for name, value in load_state(directory / "state.pt").items() if isinstance(value, dict)}
    try:
        flat = load_file(str(directory / "weights.safetensors"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: incomplete checkpoint (weights.safetensors missing)") from None
    except Exception as err:
        raise CheckpointError(f"{directory}: unreadable weights.safetensors ({type(err).__name__}: {err})") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        name, param = key.split("/", 1)
        out.setdefault(name, {})[param] = value
    return out


def write_meta(directory: str | Path, meta: dict) -> None:
    atomic_write_json(Path(directory) / "meta.json", meta)


def load_checkpoint(directory: str | Path) -> tuple[dict[str, dict], dict]:
    """(weights, meta) of a downloaded checkpoint directory: what an export needs."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: incomplete checkpoint (meta.json missing)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{directory}: unreadable meta.json ({err})") from None
    return load_weights(directory), meta


def load_state(path: str | Path, mmap: bool = False):
    """A torch file of tensors and plain containers, never code (weights_only=True). mmap=True maps the
    tensors' data instead of reading it: the pickle is still read, and refused, in full."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: incomplete checkpoint ({path.name} missing)") from None
    except Exception as err:  # corrupt zip / unpickling refused
        if "Weights only load failed" in str(err):  # torch's text goes on to explain how to load it unsafely: not here
            raise CheckpointError(f"{path}: unreadable (refused by the safe loader: it holds objects other than tensors and plain data)") from None
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


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
    """-> (generator network in eval mode, meta) from generator.safetensors + generator.json."""
    from gen_core.models import GAN_ARCHS, GeneratorSpec, build_generator

    state, meta = load_generator_export(directory)
    spec = GeneratorSpec(**meta["generator_spec"])
    if spec.arch not in GAN_ARCHS:
        raise CheckpointError(f"{directory}/generator.json: unknown generator arch {spec.arch!r} (known: {', '.join(GAN_ARCHS)})")
    generator = build_generator(spec)
    generator.load_state_dict(state)
    return generator.eval(), meta


def load_generator_export(directory: str | Path) -> tuple[dict, dict]:
    directory = Path(directory)
    try:
        meta = json.loads((directory / "generator.json").read_text())
        return load_file(str(directory / "generator.safetensors")), meta
    except FileNotFoundError as err:
        raise CheckpointError(f"{directory}: no exported generator ({Path(err.filename).name} missing)") from None


