"""The original Brain-JEPA encoder code path, restated independently for comparison.

This mirrors the published ``VisionTransformer`` (``src/models/vision_transformer.py``) as the
model description gives it, with its module names, so a ``target_encoder`` state dict loads as
is: positional table built the original way (numpy float64 meshgrid, ``repeat_interleave`` of
the gradient projection, min-max over the whole table), attention written out as
``softmax(q kᵀ · scale) v`` with an explicit ``N x N`` matrix. It is deliberately plain and
slow: tests use it as the fidelity reference for :class:`brainjepa_fast.Encoder`, and the
benchmarks as "the original code path". It shares no code with ``model.py``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=float)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class OriginalPositionEmbedding(nn.Module):
    """``GradTs_2dPE`` with ``add_w='mapping'``."""

    def __init__(self, in_chan: int, embed_dim: int, grid_size: tuple):
        super().__init__()
        grid_h = np.arange(grid_size[0], dtype=float)
        grid_w = np.arange(grid_size[1], dtype=float)
        grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size[0], grid_size[1]])
        self.n_t = grid_size[1]
        self.emb_h = nn.Parameter(torch.from_numpy(_sincos_1d(embed_dim // 2, grid[0])).float(), requires_grad=False)
        self.predictor_pos_embed_proj = nn.Linear(in_chan, embed_dim // 2)

    def forward(self, gradient: torch.Tensor) -> torch.Tensor:
        emb_w = self.predictor_pos_embed_proj(gradient).squeeze().repeat_interleave(self.n_t, dim=0)
        emb_w = (emb_w - emb_w.min()) / (emb_w.max() - emb_w.min()) * 2 - 1
        return torch.cat([self.emb_h, emb_w], dim=1).unsqueeze(0)


class OriginalAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class OriginalMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OriginalBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = OriginalAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = OriginalMLP(dim, dim * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OriginalPatchEmbed(nn.Module):
    def __init__(self, img_size: tuple, embed_dim: int, patch_size: int = 16):
        super().__init__()
        self.num_patches_2d = (img_size[0], img_size[1] // patch_size)
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=(1, patch_size), stride=(1, patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


_SIZES = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


class OriginalVisionTransformer(nn.Module):
    """The original encoder: ``forward([B, 1, R, T]) -> [B, R*T/16, D]`` (no masks)."""

    def __init__(self, gradient_pos_embed: torch.Tensor, variant: str = "vit_base", img_size: tuple = (450, 160)):
        super().__init__()
        dim, depth, heads = _SIZES[variant]
        self.gradient_pos_embed = gradient_pos_embed
        self.patch_embed = OriginalPatchEmbed(img_size, dim)
        self.pos_embed_proj = OriginalPositionEmbedding(gradient_pos_embed.shape[-1], dim, self.patch_embed.num_patches_2d)
        self.blocks = nn.ModuleList([OriginalBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.pos_embed_proj(self.gradient_pos_embed.to(x.device))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
