"""Window planning with TerraTorch 1.2.11's tiled-inference semantics, for scenes that are never held in memory.

TerraTorch (``terratorch/tasks/tiled_inference.py``) reflect-pads the whole scene by ``delta``, cuts ``crop``-sized
windows every ``stride`` pixels plus one last row/column of windows shifted inside the padded scene, keeps only the
central ``crop - 2*delta`` of each window's output, weights it by a cosine blend mask and divides by the summed
weights (``average_patches``), or lets the last window in its list order win (``average_patches=False``). This
module computes the same window positions, ranks and masks from the scene size alone, so a worker can read and
blend window by window (:mod:`encdec.predict.engine`).

Where TerraTorch leaves pixels uncovered and raises ("Some pixels did not receive a classification!": a padded
size of exactly ``crop + 1``, or ``stride == crop - 2*delta`` with an unlucky size) a window is added so no pixel is
dropped. A scene that fits in one window (``H <= h_crop`` and ``W <= w_crop``) is, as in TerraTorch 1.2.11, one
forward pass of the unpadded scene (``WindowPlan.single``). Between that and ``crop - 2*delta`` (only possible in
one axis) the scene is extended by reflection to that size and cropped back.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Strip", "TiledParams", "Tiling", "Window", "WindowPlan", "plan_windows", "reflect_index"]


class TiledParams(BaseModel):
    """TerraTorch's ``tiled_inference`` keyword arguments, with its meaning and defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop: int = Field(224, ge=1, description="Window height and width (TerraTorch `crop`); usually the model's img_size.")
    stride: int = Field(192, ge=1, description="Step between windows (TerraTorch `stride`).")
    delta: int = Field(8, ge=0, description="Border of each window's output that is discarded (TerraTorch `delta`); "
                                            "the scene is reflect-padded by it. Reduced to (crop-stride)//2 if larger.")
    h_crop: int | None = Field(None, ge=1, description="Window height (overrides crop).")
    w_crop: int | None = Field(None, ge=1, description="Window width (overrides crop).")
    h_stride: int | None = Field(None, ge=1, description="Vertical step (overrides stride).")
    w_stride: int | None = Field(None, ge=1, description="Horizontal step (overrides stride).")
    average_patches: bool = Field(True, description="Average overlapping windows (weighted by the blend mask); "
                                                    "False: the last window in TerraTorch's order wins.")
    blend_overlaps: bool = Field(True, description="Weight window borders with TerraTorch's cosine blend mask.")
    batch_size: int = Field(16, ge=1, description="Windows per forward pass.")
    padding: Literal["reflect"] = Field("reflect", description="Scene padding by delta (TerraTorch's default).")

    @model_validator(mode="after")
    def _stride_fits(self) -> TiledParams:
        for axis, crop, stride in (("h", self.h_crop or self.crop, self.h_stride or self.stride),
                                   ("w", self.w_crop or self.crop, self.w_stride or self.stride)):
            if stride > crop:
                raise ValueError(f"{axis}_stride={stride} is larger than {axis}_crop={crop}: windows would leave "
                                 f"gaps. Fix: a stride <= crop (e.g. stride={max(1, crop - crop // 8)}).")
        return self

    def resolve(self) -> Tiling:
        """Crop/stride per axis and the effective ``delta`` (TerraTorch's reduction, with its warning)."""
        hc, wc = self.h_crop or self.crop, self.w_crop or self.crop
        hs, ws = self.h_stride or self.stride, self.w_stride or self.stride
        delta = self.delta
        if (hc - hs) // 2 < delta or (wc - ws) // 2 < delta:
            delta = min((hc - hs) // 2, (wc - ws) // 2)
            warnings.warn(f"Tiled inference: delta is higher than overlap, reducing delta to {delta}.", stacklevel=2)
        return Tiling(hc, wc, hs, ws, delta, self.average_patches, self.blend_overlaps, self.batch_size)


@dataclass(frozen=True)
class Tiling:
    """Resolved tiling: per-axis crop and stride, the effective delta."""

    h_crop: int
    w_crop: int
    h_stride: int
    w_stride: int
    delta: int
    average_patches: bool
    blend_overlaps: bool
    batch_size: int

    @property
    def out_h(self) -> int:
        """Rows of a window's output that are kept."""
        return self.h_crop - 2 * self.delta

    @property
    def out_w(self) -> int:
        """Columns of a window's output that are kept."""
        return self.w_crop - 2 * self.delta

    def as_tags(self) -> dict[str, str]:
        """The parameters as GeoTIFF tags."""
        return {f"tiled_{k}": str(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True, order=True)
class Window:
    """One window: its top-left in padded-scene coordinates; its output lands at the same (row, col) of the scene.

    ``rank`` is the window's index in TerraTorch's list order (right column, bottom row, corner, then the grid row
    by row): with ``average_patches=False`` the highest rank covering a pixel wins, as the last write does there.
    """

    row: int
    col: int
    rank: int


@dataclass(frozen=True)
class Strip:
    """Output rows ``[y0, y1)`` of a scene and the windows (sorted by row, col) that contribute to them."""

    index: int
    y0: int
    y1: int
    windows: tuple[Window, ...]


def _positions(padded: int, crop: int, stride: int, keep: int, size: int) -> tuple[list[int], list[int]]:
    """TerraTorch's window starts on one axis (grid starts, shifted last start), plus any starts added for coverage.

    Returns ``(grid, extra)``: ``grid`` is TerraTorch's ``range(0, padded - crop - 1, stride)``; the last start
    ``padded - crop`` is implied; ``extra`` are starts added where those leave output pixels ``[0, size)`` uncovered.
    """
    grid = list(range(0, padded - crop - 1, stride))
    last = padded - crop
    starts = sorted({*grid, last})
    extra: list[int] = []
    covered = 0
    for s in starts:
        while s > covered:  # output of a window starting at s covers [s, s + keep)
            extra.append(covered)
            covered += keep
        covered = max(covered, s + keep)
    if covered < size:  # cannot happen (last start ends at size), kept as a guard against a wrong formula
        raise AssertionError(f"window plan leaves rows {covered}..{size} uncovered")
    return grid, extra


@dataclass(frozen=True)
class WindowPlan:
    """All windows of one scene of ``height`` x ``width`` pixels, grouped into output row strips."""

    height: int
    width: int
    tiling: Tiling
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    strips: tuple[Strip, ...]
    added: int
    single: bool = False

    @property
    def n_windows(self) -> int:
        """Windows of the scene (each counted once)."""
        return len(self.rows) * len(self.cols)

    @property
    def n_computed(self) -> int:
        """Window forwards over all strips (windows on a strip boundary are computed by both strips)."""
        return sum(len(s.windows) for s in self.strips)


def plan_windows(height: int, width: int, params: TiledParams | Tiling, *, strip_rows: int = 2048) -> WindowPlan:
    """Plan the windows of a ``height`` x ``width`` scene and split its output into row strips.

    Args:
        height: Scene rows.
        width: Scene columns.
        params: Tiled-inference parameters.
        strip_rows: Target output rows per strip (the unit of work of a worker and of resuming). Strip borders are
            put at window-row starts, so one window row per border is computed twice.

    Returns:
        The plan; ``strips`` cover ``[0, height)`` without overlap.
    """
    if height < 1 or width < 1:
        raise ValueError(f"scene size {height}x{width} is empty")
    t = params.resolve() if isinstance(params, TiledParams) else params
    if height <= t.h_crop and width <= t.w_crop:  # TerraTorch 1.2.11: no tiling, one forward of the scene
        return WindowPlan(height, width, t, (0,), (0,), (Strip(0, 0, height, (Window(0, 0, 0),)),), 0, single=True)
    # Scenes smaller than a window's kept output are extended (by reflection, see reflect_index) to that size.
    he, we = max(height, t.out_h), max(width, t.out_w)
    hp, wp = he + 2 * t.delta, we + 2 * t.delta
    grid_r, extra_r = _positions(hp, t.h_crop, t.h_stride, t.out_h, he)
    grid_c, extra_c = _positions(wp, t.w_crop, t.w_stride, t.out_w, we)
    last_r, last_c = hp - t.h_crop, wp - t.w_crop
    rows = sorted({*grid_r, *extra_r, last_r})
    cols = sorted({*grid_c, *extra_c, last_c})
    # TerraTorch's list order: right column (grid rows), bottom row (grid cols), corner, then the grid row-major.
    order: list[tuple[int, int]] = [(r, last_c) for r in grid_r] + [(last_r, c) for c in grid_c] + [(last_r, last_c)]
    order += [(r, c) for r in grid_r for c in grid_c]
    rank = {rc: i for i, rc in enumerate(order)}
    n = len(order)
    for r in rows:  # added windows (where TerraTorch raises) come after all of TerraTorch's, row-major
        for c in cols:
            if (r, c) not in rank:
                rank[(r, c)] = n
                n += 1
    strips = _strips(height, rows, cols, rank, t.out_h, strip_rows)
    added = n - len(order)
    return WindowPlan(height, width, t, tuple(rows), tuple(cols), strips, added)


def _strips(height: int, rows: list[int], cols: list[int], rank: dict[tuple[int, int], int], keep: int,
            strip_rows: int) -> tuple[Strip, ...]:
    bounds = [0]
    for r in rows[1:]:
        if r - bounds[-1] >= strip_rows and r < height:
            bounds.append(r)
    bounds.append(height)
    strips = []
    for i, (y0, y1) in enumerate(itertools.pairwise(bounds)):
        wins = tuple(Window(r, c, rank[(r, c)]) for r in rows if r < y1 and r + keep > y0 for c in cols)
        strips.append(Strip(i, y0, y1, wins))
    return tuple(strips)


def reflect_index(idx: np.ndarray, size: int) -> np.ndarray:
    """Map indices outside ``[0, size)`` into it by reflection without repeating the edge (``np.pad`` 'reflect',
    torch's 'reflect' padding), for any distance (repeated reflection)."""
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    m = np.mod(idx, period)
    return np.where(m >= size, period - m, m)


def blend_mask(t: Tiling) -> np.ndarray:
    """TerraTorch's ``get_blend_mask(h_crop, h_stride, w_crop, w_stride, delta)`` (or ones), float32 [out_h, out_w].

    Computed with torch exactly as TerraTorch does (same float32 operations), so the weights are bit-equal.
    """
    import torch

    if not t.blend_overlaps:
        return np.ones((t.out_h, t.out_w), dtype=np.float32)

    def axis(crop: int, stride: int) -> torch.Tensor:
        overlap = min(crop // 2, crop - stride) - t.delta
        pos = torch.arange(crop - 2 * t.delta, device="cpu")
        w = torch.ones_like(pos, dtype=torch.float)
        if overlap:
            ramp = torch.cos(math.pi * (pos[:overlap] + 1) / (overlap + 1)) / 2 + 0.5
            w[:overlap] = ramp.flip(0)
            w[-overlap:] = ramp
        return w

    mask = axis(t.h_crop, t.h_stride)[:, None] * axis(t.w_crop, t.w_stride)[None, :]
    mask += 1e-6
    return mask.numpy()
