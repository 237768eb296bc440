"""Fixed sin-cos encodings of Prithvi-EO-2.0: the 3D patch position embedding and the 1D encodings that the
temporal/location encoders scale.

The numbers must equal the ones the official checkpoints were trained with (and TerraTorch computes): the
embedding dimension is split 6/16 width, 6/16 height, 4/16 time, each part is ``[sin | cos]`` of
``pos * 10000 ** (-2i / d)``, and a zero row is prepended for the cls token. Everything is plain torch so that it
runs on the meta device (shape checks) as well as on real ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["interpolate_pos_embed", "sincos_1d", "sincos_3d_pos_embed"]


def sincos_1d(embed_dim: int, pos: Tensor) -> Tensor:
    """``[sin | cos]`` encoding of each position, computed in ``pos.dtype``.

    Args:
        embed_dim: output width (even).
        pos: positions of any shape; flattened to ``M`` values. Must be a floating dtype.

    Returns:
        ``[M, embed_dim]``.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    # Same operation order as the reference implementation (arange, divide, power, outer product) so the
    # float32 coordinate encodings match bit for bit.
    omega = torch.arange(embed_dim // 2, dtype=pos.dtype, device=pos.device)
    omega = omega / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_3d_pos_embed(
    embed_dim: int,
    grid: tuple[int, int, int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The fixed 3D position embedding with a leading zero row for the cls token.

    Args:
        embed_dim: token width; a multiple of 16 (split 6/16 w, 6/16 h, 4/16 t).
        grid: number of patches along (time, height, width).
        device: where to build it (``meta`` gives a shape-only tensor).
        dtype: dtype of the result (computed in float64 first, like the float64 numpy reference).

    Returns:
        ``[1, 1 + t*h*w, embed_dim]``; token order is time-major, then rows, then columns.
    """
    if embed_dim % 16:
        raise ValueError(f"the 3D sin-cos position embedding needs embed_dim divisible by 16, got {embed_dim}")
    t, h, w = (int(g) for g in grid)
    w_dim = h_dim = embed_dim // 16 * 6
    t_dim = embed_dim // 16 * 4
    f64 = torch.float64

    def axis(dim: int, n: int) -> Tensor:
        return sincos_1d(dim, torch.arange(n, dtype=f64, device=device))

    w_emb = axis(w_dim, w).repeat(t * h, 1)  # column index varies fastest
    h_emb = axis(h_dim, h).repeat_interleave(w, dim=0).repeat(t, 1)
    t_emb = axis(t_dim, t).repeat_interleave(h * w, dim=0)
    patches = torch.cat([w_emb, h_emb, t_emb], dim=1)
    cls = torch.zeros(1, embed_dim, dtype=f64, device=device)
    return torch.cat([cls, patches], dim=0).to(dtype).unsqueeze(0)


def interpolate_pos_embed(
    pos_embed: Tensor,
    grid: tuple[int, int, int],
    new_grid: tuple[int, int, int],
) -> Tensor:
    """Adapt a ``[1, 1+t*h*w, D]`` position embedding built for ``grid`` to ``new_grid``.

    Follows the reference behaviour so outputs match TerraTorch's for the same input: a changed number of
    frames recomputes the sin-cos table for the new time length (at the original h, w); a changed spatial grid
    is then bicubically interpolated (``align_corners=True``) frame by frame. The cls row is kept.

    Args:
        pos_embed: the embedding built for ``grid`` (cls row first).
        grid: (t, h, w) patches it was built for.
        new_grid: (t, h, w) patches of the current input.

    Returns:
        ``[1, 1 + prod(new_grid), D]`` in ``pos_embed``'s dtype and device.
    """
    grid = tuple(int(g) for g in grid)  # type: ignore[assignment]
    new_grid = tuple(int(g) for g in new_grid)  # type: ignore[assignment]
    if new_grid == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    if new_grid[0] != grid[0]:
        grid = (new_grid[0], grid[1], grid[2])
        pos_embed = sincos_3d_pos_embed(dim, grid, device=pos_embed.device, dtype=pos_embed.dtype)
    if new_grid[1:] == grid[1:]:
        return pos_embed
    cls_row, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(grid[0], grid[1], grid[2], dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=new_grid[1:], mode="bicubic", align_corners=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls_row, patches], dim=1)
