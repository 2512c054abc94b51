"""Representation alignment (REPA: Yu et al., "Representation Alignment for Generation: Training Diffusion Transformers
Is Easier Than You Think", ICLR 2025) with the pipeline's own classifier as the pretrained encoder.

While the denoiser learns to denoise, an early hidden state of it, passed through a small projector, is pulled towards
a frozen encoder's features of the clean image: loss = weight x (1 - cosine similarity), per position, averaged. REPA
uses DINOv2 features and reports much faster training; there is no such encoder offline here, so the target is the
classifier stage's last convolution (after its ReLU: 4 x width channels at R/4, 8 x 8 x 128 for 32 x 32 images, the
latents' own grid at downsample factor 4). The projector is dropped at export: sampling is unchanged.

- `AlignedDenoiser`: the denoiser and its projector as one module (one strategy part, one optimizer); forward ->
  (prediction, projected hidden state).
- the loss: gen_core.diffusion.alignment_loss (per-sample 1 - cosine similarity, on the coarser of the two grids).
- `ClassifierTarget`: the frozen classifier's features of images.
"""

from __future__ import annotations

import torch
from torch import nn

from gen_core.classifier import FeatureDistance
from gen_core.dit import GenforgeDiT
from gen_core.models import Classifier


def alignment_tap(denoiser: nn.Module) -> tuple[nn.Module, int]:
    """The module whose output is aligned, and its channels: REPA aligns an early block (8 of SiT-XL's 28). In a
    UNet2DModel, the first level's last residual block (before its downsample: the input's grid); in the DiT,
    the block a third of the way up (its tokens back on the patch grid)."""
    if isinstance(denoiser, GenforgeDiT):
        return denoiser.blocks[max(len(denoiser.blocks) // 3, 1) - 1], denoiser.config.hidden_size
    return denoiser.down_blocks[0].resnets[-1], denoiser.config.block_out_channels[0]


class AlignedDenoiser(nn.Module):
    """A denoiser and the projector of its tapped hidden state (1x1 convolutions width -> width -> target channels,
    SiLU between, REPA's three-layer MLP per position). forward(sample, timestep, class_labels) -> (prediction,
    projected hidden state (N, target_channels, h, w)). `denoiser` is the network that is exported."""

    def __init__(self, denoiser: nn.Module, target_channels: int, projector_width: int):
        super().__init__()
        self.denoiser = denoiser
        tap, channels = alignment_tap(denoiser)
        self.projector = nn.Sequential(
            nn.Conv2d(channels, projector_width, 1), nn.SiLU(), nn.Conv2d(projector_width, projector_width, 1), nn.SiLU(),
            nn.Conv2d(projector_width, target_channels, 1),
        )  # fmt: skip
        self._hidden: list[torch.Tensor] = []
        tap.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        if self._hidden:  # only within forward below: the denoiser called alone (sampling) keeps nothing
            self._hidden[0] = output[0] if isinstance(output, tuple) else output

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None, return_dict: bool = False):
        self._hidden.append(None)
        prediction = self.denoiser(sample, timestep, class_labels=class_labels, return_dict=False)[0]
        hidden = self._hidden.pop()
        if hidden.dim() == 3:  # DiT tokens (N, T, D) -> (N, D, side, side)
            side = int(round(hidden.shape[1] ** 0.5))
            hidden = hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], side, side)
        return prediction, self.projector(hidden)


class ClassifierTarget(nn.Module):
    """The frozen classifier's last convolutional features (after its BatchNorm and ReLU, eval mode) of images in
    [-1, 1]: (N, C, R, R) -> (N, 4 x width, R / 4, R / 4). The last tap of its FeatureDistance."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.distance = FeatureDistance(classifier)
        self.channels = self.distance.net[self.distance.taps[-1] - 1].num_features  # the BatchNorm before that ReLU

    def train(self, mode: bool = True) -> "ClassifierTarget":
        return super().train(False)  # always its running statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.distance.features(images.float())[-1]
