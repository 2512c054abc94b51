"""Pix2Pix (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks"), the network side:
a U-Net generator A -> B with skip connections, the PatchGAN discriminator judging (A, B) pairs patch by patch
(gen_core.diffusion.PatchDiscriminator on the concatenated channels), and the losses: the conditional GAN's
cross-entropy plus lambda x L1 to the target (lambda 100 in the paper).

The paper's discriminator has a 70x70 receptive field on 256x256 images; `patch_layers` picks the depth whose field is
closest to the same share of a smaller image (`receptive_field` computes it). No dropout in G: the paper's dropout is
its only noise source, and without it a translation is a deterministic function of its input (so the exported model
needs no seeds).

`Translator` is the exported model (generator.safetensors + generator.json with family "pix2pix", as a GAN's export):
`translate(a)` for inputs already in the model's condition space, `from_images(uint8 B)` to make the inputs first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gen_core.checkpoint import CheckpointError, load_generator_export
from gen_core.diffusion import PatchDiscriminator
from gen_core.paired import edges
from gen_core.sampling import image_grid, png_bytes, to_uint8

PAPER_FIELD_SHARE = 70 / 256  # the paper's receptive field over its image side


class UNetGenerator(nn.Module):
    """(N, in_channels, R, R) in [-1, 1] -> (N, out_channels, R, R) in [-1, 1]; `levels` stride-2 halvings (R divisible by
    2**levels), widths doubling to at most 8x `width`, each decoder level fed the encoder's map of its size."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, levels: int = 3):
        super().__init__()
        widths = [width * min(2**i, 8) for i in range(levels)]
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            layers = [nn.Conv2d(in_channels if i == 0 else widths[i - 1], w, 4, 2, 1)]
            self.down.append(nn.Sequential(*layers, *([nn.InstanceNorm2d(w, affine=True)] if i else []), nn.LeakyReLU(0.2)))
        self.up = nn.ModuleList()
        for i in reversed(range(1, levels)):  # from the bottleneck up; input: the level below (+ its skip, but the lowest)
            source = widths[i] if i == levels - 1 else 2 * widths[i]
            self.up.append(nn.Sequential(nn.ConvTranspose2d(source, widths[i - 1], 4, 2, 1), nn.InstanceNorm2d(widths[i - 1], affine=True), nn.ReLU()))
        self.out = nn.ConvTranspose2d(2 * widths[0] if levels > 1 else widths[0], out_channels, 4, 2, 1)
        self.levels = levels

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] % 2**self.levels:
            raise ValueError(f"pix2pix generator: image side {a.shape[-1]} must be divisible by 2**levels = {2**self.levels}")
        skips = []
        x = a
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck feeds the first up block directly
        for block in self.up:
            x = torch.cat([block(x), skips.pop()], dim=1)
        return torch.tanh(self.out(x))


def receptive_field(layers: int) -> int:
    """The receptive field (pixels) of PatchDiscriminator(layers=layers): 4x4 convolutions, `layers` of stride 2, then two of stride 1."""
    field = 1
    for stride in [1, 1] + [2] * layers:  # from the output back to the input
        field = (field - 1) * stride + 4
    return field


def patch_layers(resolution: int) -> int:
    """The discriminator depth whose receptive field is nearest the paper's share of the image (at least 1)."""
    target = PAPER_FIELD_SHARE * resolution
    return min(range(1, 6), key=lambda layers: (abs(receptive_field(layers) - target), layers))


def build_patch_discriminator(a_channels: int, b_channels: int, resolution: int, width: int = 32) -> PatchDiscriminator:
    """The conditional PatchGAN: judges the channel concatenation of (A, B)."""
    return PatchDiscriminator(a_channels + b_channels, width, patch_layers(resolution))


def pix2pix_d_loss(G: nn.Module, D: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D's loss: real pairs (A, B) as 1 and translated pairs (A, G(A)) as 0, patch-wise cross-entropy, halved as in the paper."""
    with torch.no_grad():
        fake = G(a)
    real_logits, fake_logits = D(torch.cat([a, b], 1)).float(), D(torch.cat([a, fake], 1)).float()
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    return 0.5 * (real + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def pix2pix_g_loss(G: nn.Module, D: nn.Module, a: torch.Tensor, b: torch.Tensor, l1_weight: float = 100.0) -> tuple[torch.Tensor, dict]:
    """G's loss: fool D on (A, G(A)) plus l1_weight x mean |G(A) - B|. -> (loss, {"adversarial": ..., "l1": ...})."""
    fake = G(a)
    logits = D(torch.cat([a, fake], 1)).float()
    adversarial = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    l1 = (fake.float() - b.float()).abs().mean()
    return adversarial + l1_weight * l1, {"adversarial": adversarial.detach(), "l1": l1.detach()}


def condition_images(images_uint8: np.ndarray, condition: str = "edges", edge_threshold: float | None = 0.2) -> torch.Tensor:
    """(N, C, R, R) uint8 images B -> the inputs A, (N, 1, R, R) in [-1, 1] (`edges`: gen_core.paired.edges). A model
    trained on user pairs (`pairs`) has no transform: its inputs come with the data, or with the request."""
    if condition == "pairs":
        raise ValueError("pix2pix condition pairs: a model trained on user pairs cannot make its inputs from images; send the inputs themselves")
    if condition != "edges":
        raise ValueError(f"pix2pix condition {condition!r}: unknown (known: edges, pairs)")
    return torch.from_numpy(edges(images_uint8, edge_threshold)) * 2 - 1


def pair_inputs(split, condition: str, edge_threshold: float | None) -> torch.Tensor:
    """A prepared split's pair inputs A in [-1, 1]: its images' edge maps (`edges`), or the user pairs' inputs it holds (`pairs`)."""
    if condition == "pairs":
        if split.inputs is None:
            raise ValueError("pix2pix.condition pairs: the prepared data has no pairs (prepare an image_folder with data.pairs folders or side_by_side)")
        return torch.from_numpy(split.inputs).float() / 127.5 - 1
    return condition_images(split.images, condition, edge_threshold)


def generator_spec(cfg_model, channels: int, condition: str = "edges") -> dict:
    """What builds G, as recorded in the export: A has one channel (an edge map) or, for user pairs, the data's
    channels; B the data's channels."""
    return {"in_channels": channels if condition == "pairs" else 1, "out_channels": channels, "width": cfg_model.g_width, "levels": cfg_model.g_levels}


@dataclass
class Translator:
    """An exported Pix2Pix generator with how its inputs are made (generator.json: condition, edge_threshold)."""

    generator: UNetGenerator
    meta: dict

    @classmethod
    def load(cls, directory: str | Path) -> "Translator":
        state, meta = load_generator_export(directory)
        if meta.get("family") != "pix2pix":
            raise CheckpointError(f"{directory}/generator.json: a {meta.get('family', 'gan')} model, not pix2pix")
        generator = UNetGenerator(**meta["generator_spec"])
        generator.load_state_dict(state)
        return cls(generator.eval(), meta)

    @property
    def num_classes(self) -> int:
        return len(self.meta.get("class_names") or [])

    @property
    def input_channels(self) -> int:
        return self.meta["generator_spec"]["in_channels"]

    def to(self, device) -> "Translator":
        self.generator.to(device)
        return self

    def condition(self, images_uint8: np.ndarray) -> torch.Tensor:
        """Images B (uint8) -> this model's inputs A."""
        return condition_images(images_uint8, self.meta["condition"], self.meta["edge_threshold"])

    @torch.no_grad()
    def translate(self, a: torch.Tensor, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, in_channels, R, R) inputs in [-1, 1] -> (N, C, R, R) translations in [-1, 1], float32 on the CPU."""
        expected = (self.input_channels, self.meta["resolution"], self.meta["resolution"])
        if a.ndim != 4 or tuple(a.shape[1:]) != expected:
            raise ValueError(f"pix2pix input of shape {tuple(a.shape)}: expected (N, {expected[0]}, {expected[1]}, {expected[2]})")
        device = torch.device(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return self.generator(a.to(device)).float().cpu()

    def inputs(self, images_uint8: np.ndarray, given: str = "condition") -> torch.Tensor:
        """Request images (N, C, R, R) uint8 -> the model's inputs: `condition`: they are the inputs (0..255 -> -1..1, made
        grey for a one-channel input, grey repeated for a colour one), `image`: made from them."""
        if given == "image":
            return self.condition(images_uint8)
        x = torch.from_numpy(images_uint8).float() / 127.5 - 1
        if self.input_channels == 1:
            return x.mean(1, keepdim=True)
        return x.expand(-1, self.input_channels, -1, -1) if x.shape[1] == 1 else x

    def from_images(self, images_uint8: np.ndarray, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Images B -> G(condition(B)): what the evaluation compares with B."""
        return self.translate(self.condition(images_uint8), device, autocast_dtype)


def triplet_grid_png(a: torch.Tensor, translated: torch.Tensor, b: torch.Tensor) -> bytes:
    """Rows of input / translation / target, one column per example (all in [-1, 1]; a 1-channel input is shown grey)."""
    a = a.expand(-1, translated.shape[1], -1, -1)
    return png_bytes(image_grid(to_uint8(torch.cat([a, translated, b]).cpu()), rows=3))
