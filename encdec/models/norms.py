"""Normalisation layers selectable by name in built-in necks, decoders and heads.

``batch`` is the TerraTorch default. ``group`` / ``frozen_batch`` / ``none`` have no batch statistics, so a
model built with them gives exactly the same result whether a global batch is split across ranks or not (the
distributed parity tests rely on this). ``sync_batch`` is converted by the strategy where the backend has it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("batch", "group", "frozen_batch", "layer", "none")

__all__ = ["NORMS", "FrozenBatchNorm2d", "LayerNorm2d", "make_norm2d"]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters held as buffers (no batch dependence)."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of ``[B, C, H, W]``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_norm2d(norm: str, channels: int) -> nn.Module:
    """A 2D norm layer for ``channels`` by name (one of ``NORMS``)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        # 32 groups as in the GroupNorm paper, fewer when the channel count does not divide
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if norm == "frozen_batch":
        return FrozenBatchNorm2d(channels)
    if norm == "layer":
        return LayerNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm {norm!r} is not supported; use one of {', '.join(NORMS)}")
