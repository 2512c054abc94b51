"""Errors for files the networks need: a checkpoint or latents that do not fit, a feature network that fails
its checksum. Their messages are one line naming the file. They live apart from the torch code that raises
them so that a stage which only reports them (pipelines.common) starts without importing torch."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the current run."""


class LatentMismatchError(CheckpointError):
    """Latents, denoiser and autoencoder that do not belong together (channels, scale, weights)."""


class FeatureNetError(RuntimeError):
    """The FID feature network cannot be found or fails its checksum."""
