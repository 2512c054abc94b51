"""One interface over the model families, for evaluation, registration and serving.

An exported generator directory always holds `generator.json` with a `family` key:
    gan  generator.safetensors (+ spec in generator.json)
    ldm  unet/ [vae/] scheduler/ in diffusers format (gen_core.diffusion.DiffusionGenerator)
    pix2pix  generator.safetensors (+ spec in generator.json), an image-to-image translator (gen_core.pix2pix.Translator)
    t2i  unet/ vae/ scheduler/ in diffusers format, text-to-image (gen_core.text_diffusion.TextDiffusionGenerator)
`load_image_generator` returns an object with `num_classes` and `to(device)`; the class-conditional families'
have `sample(labels, seeds, device) -> (N, C, R, R) in [-1, 1]`, where sample i depends only on
(labels[i], seeds[i]); a text-to-image model's takes prompts instead of labels; a translator has `translate(inputs)`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gen_core.checkpoint import CheckpointError, load_generator
from gen_core.models import Generator
from gen_core.sampling import check_labels, sample_gan


# The families measured on samples made from the reference images (pix2pix: their edge maps; t2i: their captions), and
# the measures they add to the evaluation record (pipelines.evaluation), means over the samples that have one
PAIRED_FAMILIES = ("pix2pix", "t2i")
PAIRED_KEYS = ("l1", "psnr", "brightness_agreement", "size_agreement")


@dataclass
class GanGenerator:
    generator: Generator

    @property
    def num_classes(self) -> int:
        return self.generator.spec.num_classes

    def to(self, device) -> "GanGenerator":
        self.generator.to(device)
        return self

    def sample(self, labels: torch.Tensor, seeds, device: torch.device | str = "cpu", **_) -> torch.Tensor:
        return sample_gan(self.generator, check_labels(labels, self.num_classes), seeds, device)


def read_generator_meta(directory: str | Path) -> dict:
    try:
        return json.loads((Path(directory) / "generator.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no exported generator (generator.json missing)") from None


def load_image_generator(directory: str | Path):
    """-> (GanGenerator | DiffusionGenerator | Translator | TextDiffusionGenerator in eval mode, meta)."""
    meta = read_generator_meta(directory)
    if meta.get("family", "gan") == "gan":
        generator, meta = load_generator(directory)
        return GanGenerator(generator), meta
    if meta["family"] == "pix2pix":
        from gen_core.pix2pix import Translator

        translator = Translator.load(directory)
        return translator, translator.meta
    if meta["family"] == "t2i":
        from gen_core.text_diffusion import TextDiffusionGenerator

        return TextDiffusionGenerator.from_pretrained(directory)
    from gen_core.diffusion import DiffusionGenerator

    return DiffusionGenerator.from_pretrained(directory)


def weight_files(directory: str | Path) -> list[Path]:
    """The files that define an exported generator (weights, configs, and a diffusion model's diffusers pipeline class), sorted."""
    directory = Path(directory)
    return sorted(p for p in directory.rglob("*") if p.is_file() and (p.suffix in {".safetensors", ".json"} or p.name == "genforge_pipeline.py"))


def generator_digest(directory: str | Path) -> str:
    """sha256 over the exported weights and configs, and the sampler settings (guidance changes the
    images): identifies a model across reruns."""
    digest = hashlib.sha256()
    directory = Path(directory)
    meta = read_generator_meta(directory)
    digest.update(json.dumps({key: meta.get(key) for key in ("family", "sampler")}, sort_keys=True).encode())
    for path in weight_files(directory):
        if path.name == "generator.json":
            continue  # provenance (paths, run ids) is not the model; its sampler settings are hashed above
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
