"""Tiny encoders used as test data for necks, decoders and the factory (real modules, a few k params).

``TinyViT`` follows the Prithvi/TerraTorch encoder contract for plain ViTs: one ``[B, 1+N, D]`` tensor per
block, ``out_channels = [D] * depth``, ``patch_size`` and ``blocks``. ``TinyPyramid`` is a CNN returning
maps at strides 4, 8, 16, 32 (a ResNet-like pyramid).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TinyPyramid", "TinyViT", "pyramid_maps", "vit_maps", "vit_tokens"]


class _Block(nn.Module):
    """Pre-norm residual token mixing (a linear map of the mean token, standing in for attention) and MLP:
    every token, the cls token included, influences every output token, as in a ViT."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mix(self.norm(x).mean(dim=1, keepdim=True))
        return x + self.mlp(self.norm(x))


class TinyViT(nn.Module):
    """Patch embedding + cls token + ``depth`` blocks; returns every block's tokens ``[B, 1+N, D]``."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 32, depth: int = 4, patch_size: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(embed_dim) for _ in range(depth))
        self.out_channels = [embed_dim] * depth
        self.patch_size = patch_size

    def forward(self, x: Tensor, **_: object) -> list[Tensor]:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out


class TinyPyramid(nn.Module):
    """Conv stages returning one map per stage; by default strides 4, 8, 16, 32 with channels ``[w, 2w, 3w, 4w]``.

    ``chans`` and ``strides`` (per stage, relative to the previous stage) give other pyramids.
    """

    def __init__(self, in_chans: int = 3, width: int = 8, chans: list[int] | None = None,
                 strides: list[int] | None = None) -> None:
        super().__init__()
        chans = chans or [width, 2 * width, 3 * width, 4 * width]
        strides = strides or [4] + [2] * (len(chans) - 1)
        self.stages = nn.ModuleList()
        prev = in_chans
        for c, stride in zip(chans, strides, strict=True):
            self.stages.append(nn.Sequential(nn.Conv2d(prev, c, 3, stride=stride, padding=1), nn.ReLU()))
            prev = c
        self.out_channels = chans
        self.patch_size = 1
        for stride in strides:
            self.patch_size *= stride

    def forward(self, x: Tensor, **_: object) -> list[Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


def vit_tokens(batch: int = 2, dim: int = 32, depth: int = 4, grid: tuple[int, int] = (4, 4), t: int = 1) -> list[Tensor]:
    """``depth`` random ViT outputs ``[batch, 1 + t*h*w, dim]``."""
    n = 1 + t * grid[0] * grid[1]
    return [torch.randn(batch, n, dim) for _ in range(depth)]


def vit_maps(batch: int = 2, dim: int = 32, depth: int = 4, size: int = 4) -> list[Tensor]:
    """``depth`` same-size maps ``[batch, dim, size, size]`` (reshaped ViT outputs)."""
    return [torch.randn(batch, dim, size, size) for _ in range(depth)]


def pyramid_maps(batch: int = 2, chans: tuple[int, ...] = (8, 16, 24, 32), size: int = 16) -> list[Tensor]:
    """A pyramid: level ``i`` has ``chans[i]`` channels and side ``size / 2**i``."""
    return [torch.randn(batch, c, size >> i, size >> i) for i, c in enumerate(chans)]
