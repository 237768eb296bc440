"""Building blocks of the Prithvi-EO-2.0 encoder: 3D patch embedding, pre-norm transformer block with a fused
``qkv`` projection, and the learnable-scale temporal/location encoders of the ``_tl`` variants.

Attribute names reproduce the official checkpoints' (``patch_embed.proj``, ``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``, ``norm1``, ``norm2``, ``temporal_embed_enc.scale``...) so that state dicts map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encdec.models.backbones.prithvi_pos import sincos_1d

__all__ = ["Attention", "Block", "DropPath", "LocationEncoder", "Mlp", "PatchConv3d", "PatchEmbed3D", "TemporalEncoder"]


class PatchConv3d(nn.Conv3d):
    """A ``Conv3d`` whose kernel equals its stride (non-overlapping patches), computed as one matmul.

    Patches do not overlap, so the convolution is exactly ``F.linear`` of the flattened patches with the
    flattened kernel. The matmul path is used because oneDNN's bf16 convolution (torch 2.14 on AVX-512-BF16
    CPUs) returns wrong values for this shape (kernel = stride = 16, few input and >= 256 output channels:
    relative error ~1.1), while its bf16 matmul is correct; it is also one large GEMM instead of a strided
    convolution. It stays an ``nn.Conv3d`` with the same ``weight [E, C, t, p, p]`` and ``bias [E]``, so
    checkpoints, state-dict keys, initialisation and ``isinstance`` checks (PEFT, precision casts) are unchanged,
    and its own ``forward`` is called (parameter gathering hooks of ZeRO-3 / FSDP see the module run).
    Input ``[B, C, T, H, W]``; trailing frames / pixels that do not fill a patch are dropped, as a strided conv does.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: tuple[int, int, int], bias: bool = True) -> None:
        super().__init__(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"{type(self).__name__} expects [B, C, T, H, W], got shape {tuple(x.shape)}")
        b, c = x.shape[:2]
        pt, ph, pw = self.kernel_size
        t, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        x = x[:, :, : t * pt, : h * ph, : w * pw]
        # [B, C, t, pt, h, ph, w, pw] -> [B, t, h, w, C, pt, ph, pw]: one row per patch, in the kernel's order
        patches = x.reshape(b, c, t, pt, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t * h * w, -1)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        # [B, t*h*w, E] viewed as the conv's [B, E, t, h, w] (no copy; PatchEmbed3D flattens it back for free)
        return out.view(b, t, h, w, -1).permute(0, 4, 1, 2, 3)


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches (``PatchConv3d``, kernel = stride = patch size) flattened to tokens
    ``[B, t*h*w, D]`` (time-major)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = PatchConv3d(in_chans, embed_dim, patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``.

    ``qkv`` is one ``Linear(D, 3D)`` as in the checkpoints; the PEFT code may swap it for any module that maps
    ``[B, N, D]`` to ``[B, N, 3D]`` in the same (q, k, v) order.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc1 -> GELU (exact) -> fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample: drops the residual branch with probability ``p`` while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (LayerNorm eps 1e-5)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TemporalEncoder(nn.Module):
    """``scale * [sincos(year) | sincos(day of year)]`` per frame, repeated over the frame's tokens.

    With ``trainable_scale`` (the ``_tl`` variants) the scale is learnable and starts at 0.1 so a pretrained encoder
    is barely disturbed at first; otherwise it is a fixed buffer of 1.0, as TerraTorch's ``coords_scale_learn=False``.
    """

    scale: Tensor

    def __init__(self, embed_dim: int, trainable_scale: bool = True) -> None:
        super().__init__()
        self.year_dim = embed_dim // 2
        self.day_dim = embed_dim - self.year_dim
        self.trainable_scale = trainable_scale
        if trainable_scale:
            self.scale = nn.Parameter(torch.full((1,), 0.1))
        else:
            self.register_buffer("scale", torch.ones(1))

    def forward(self, temporal_coords: Tensor, tokens_per_frame: int) -> Tensor:
        """``temporal_coords [B, T, 2]`` (year, day of year) -> ``[B, T * tokens_per_frame, D]``."""
        b, t = temporal_coords.shape[:2]
        year = sincos_1d(self.year_dim, temporal_coords[:, :, 0].flatten()).reshape(b, t, -1)
        day = sincos_1d(self.day_dim, temporal_coords[:, :, 1].flatten()).reshape(b, t, -1)
        emb = self.scale * torch.cat([year, day], dim=-1)
        return torch.repeat_interleave(emb, tokens_per_frame, dim=1)


class LocationEncoder(nn.Module):
    """``scale * [sincos(lat) | sincos(lon)]``, one vector per sample added to every token (scale as in
    ``TemporalEncoder``)."""

    scale: Tensor

    def __init__(self, embed_dim: int, trainable_scale: bool = True) -> None:
        super().__init__()
        self.lat_dim = embed_dim // 2
        self.lon_dim = embed_dim - self.lat_dim
        self.trainable_scale = trainable_scale
        if trainable_scale:
            self.scale = nn.Parameter(torch.full((1,), 0.1))
        else:
            self.register_buffer("scale", torch.ones(1))

    def forward(self, location_coords: Tensor) -> Tensor:
        """``location_coords [B, 2]`` (lat, lon) -> ``[B, 1, D]``."""
        b = location_coords.shape[0]
        lat = sincos_1d(self.lat_dim, location_coords[:, 0].flatten()).reshape(b, 1, -1)
        lon = sincos_1d(self.lon_dim, location_coords[:, 1].flatten()).reshape(b, 1, -1)
        return self.scale * torch.cat([lat, lon], dim=-1)
