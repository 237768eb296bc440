"""Normalisation layers selectable by name in built-in necks, decoders and heads.

Defaults follow TerraTorch per component: ``batch`` (UperNet, necks, heads), ``layer`` (FCNDecoder).
``group`` / ``layer`` / ``frozen_batch`` / ``none`` have no batch statistics, so a
model built with them gives exactly the same result whether a global batch is split across ranks or not (the
distributed parity tests rely on this). ``sync_batch`` is converted by the strategy where the backend has it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("batch", "group", "frozen_batch", "layer", "none")

__all__ = ["NORMS", "FrozenBatchNorm2d", "LayerNorm2d", "conv_bias", "group_count", "make_norm2d"]


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


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of ``[B, C, H, W]`` (eps 1e-6).

    Laid out as TerraTorch's ``Norm2d`` (the LayerNorm is the ``ln`` submodule, eps 1e-6) so that the
    ``FCNDecoder`` keys ``decoder.convs.<i>.2.ln.weight`` of TerraTorch checkpoints load unchanged.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def group_count(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """Groups for a GroupNorm over ``channels``: the most groups (at most ``max_groups``) that divide ``channels``
    and keep at least ``min_per_group`` channels per group (1 when ``channels < min_per_group``).

    One or two channels per group normalise each channel on its own: on a 1x1 pooled map at micro-batch 1
    (UperNet's PPM) that leaves a single value per group and the output is identically zero.
    """
    limit = max(1, min(max_groups, channels // min_per_group))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def make_norm2d(norm: str, channels: int) -> nn.Module:
    """A 2D norm layer for ``channels`` by name (one of ``NORMS``)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "frozen_batch":
        return FrozenBatchNorm2d(channels)
    if norm == "layer":
        return LayerNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm {norm!r} is not supported; use one of {', '.join(NORMS)}")


def conv_bias(norm: str) -> bool:
    """Whether a conv directly followed by ``make_norm2d(norm)`` carries a bias.

    Not before batch / group / layer norms (their mean subtraction removes most or all of it, and TerraTorch's
    ConvModule has none there, so the keys match its checkpoints); yes without a norm and before a frozen
    batch norm, whose affine terms are fixed buffers (the bias is then the only learnable shift).
    """
    return norm in ("none", "frozen_batch")
