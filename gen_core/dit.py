"""A compact class-conditional DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") as a diffusers
model: adaLN-Zero blocks over patches of the latent, one shared timestep + class conditioning vector.

Why not diffusers' DiTTransformer2DModel: its label embedding drops labels by itself in training mode (p = 0.1 with the
global torch RNG, doubling genforge's seeded label dropout and breaking per-(step, rank) determinism), each of its blocks
carries its own timestep MLP and label table, it needs a timestep per sample, its final layer calls block 0's embedding
from outside that block (which FSDP2 cannot shard as a unit), and it is not zero-initialised for training from scratch.

This module has the call and config of UNet2DModel as genforge uses it: `(sample, timestep, class_labels) -> (out,)`,
`sample_size`, `in_channels`, `num_class_embeds` (the last class is guidance's null class). Exported models carry a copy
of this file as unet/genforge_dit.py, so it imports only torch and diffusers: diffusers loads the copy itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def sincos_positions(size: int, dim: int) -> torch.Tensor:
    """(size * size, dim) fixed 2-D sine-cosine position embedding (half the channels per axis), row-major tokens."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    grid = torch.arange(size, dtype=torch.float64)
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    parts = [f(axis.reshape(-1, 1) * frequencies) for axis in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm self-attention and MLP, each gated and modulated by the conditioning (adaLN-Zero: the gates start at 0,
    so every block starts as the identity)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)
        self.modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, T, D) tokens, c (N, D) conditioning -> (N, T, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=1)
        n, t, d = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = x + gate1[:, None] * self.proj(attention)
        hidden = F.gelu(self.fc1(modulate(self.norm2(x), shift2, scale2)), approximate="tanh")
        return x + gate2[:, None] * self.fc2(hidden)


class GenforgeDiT(ModelMixin, ConfigMixin):
    """Class-conditional DiT on (N, in_channels, sample_size, sample_size) inputs, `patch_size` pixels a token.
    `num_class_embeds` = classes + 1: the last is the "null" class of classifier-free guidance."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 4, num_class_embeds: int = 11, patch_size: int = 1,
                 hidden_size: int = 192, num_layers: int = 6, num_heads: int = 3, mlp_ratio: float = 4.0):  # fmt: skip
        super().__init__()
        if sample_size % patch_size or hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"DiT: patch_size {patch_size} must divide sample_size {sample_size}, num_heads {num_heads} and 4 hidden_size {hidden_size}")
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("positions", sincos_positions(sample_size // patch_size, hidden_size), persistent=False)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(256, hidden_size)
        self.class_embedding = nn.Embedding(num_class_embeds, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, and zeros for every adaLN modulation and the
        output layer, so the untrained network predicts 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.class_embedding.weight, std=0.02)
        for linear in (self.time_embedding.linear_1, self.time_embedding.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        for linear in [block.modulation for block in self.blocks] + [self.modulation_out, self.proj_out]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor, return_dict: bool = False):
        """sample (N, C, R, R); timestep: one for all or (N,), fractional allowed; class_labels (N,) in [0, num_class_embeds)
        -> (prediction (N, C, R, R),). There is no output class: return_dict is accepted for UNet2DModel's call only."""
        n, c, size, _ = sample.shape
        p = self.config.patch_size
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(n)
        conditioning = self.time_embedding(self.time_proj(timestep).to(sample.dtype)) + self.class_embedding(class_labels)
        x = self.patch_embed(sample).flatten(2).transpose(1, 2) + self.positions.to(sample.dtype)
        for block in self.blocks:
            x = block(x, conditioning)
        shift, scale = self.modulation_out(F.silu(conditioning)).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (N, T, p * p * C)
        side = size // p
        x = x.view(n, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, size, size)
        return (x,)

