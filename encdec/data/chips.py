"""Chipping large scenes into ``img_size`` windows with a stride, without loading a scene.

Windows cover the whole scene: the last row/column of chips starts at the stride grid and runs past the edge,
and the reader pads the outside with nodata (edge chips padded). Chips that hold only nodata are dropped at
listing time, from one decimated read of the scene's validity mask (served from overviews on a COG), so the
chip list is identical on every rank and costs a few small reads per scene.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from encdec.data.sources import Sample

# The decimated validity mask is at most this many pixels on a side.
MASK_PREVIEW = 1024


def chip_windows(height: int, width: int, size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(row, col, size, size)`` windows on a ``stride`` grid covering a ``height`` x ``width`` scene.

    Args:
        height: Scene rows.
        width: Scene columns.
        size: Chip side (``data.img_size``).
        stride: Step between chips (``size`` for no overlap).

    Returns:
        Windows in row-major order; those at the bottom/right may extend past the scene (padded on read).
    """
    if size < 1 or stride < 1:
        raise ValueError(f"chip size {size} and stride {stride} must be >= 1")
    rows = max(1, math.ceil((height - size) / stride) + 1) if height > size else 1
    cols = max(1, math.ceil((width - size) / stride) + 1) if width > size else 1
    return [(r * stride, c * stride, size, size) for r in range(rows) for c in range(cols)]


def valid_preview(ds: object) -> tuple[np.ndarray, float]:
    """A decimated "any valid pixel" mask of a scene and its decimation factor.

    GDAL's dataset mask (nodata-aware) read at reduced resolution with average resampling (overviews serve it on
    COGs): a preview pixel is non-zero when any scene pixel it covers is valid, so no chip holding data is lost.
    """
    from rasterio.enums import Resampling

    height, width = ds.height, ds.width  # type: ignore[attr-defined]
    factor = max(1, math.ceil(max(height, width) / MASK_PREVIEW))
    if factor == 1:
        return ds.dataset_mask() > 0, 1.0  # type: ignore[attr-defined]
    shape = (math.ceil(height / factor), math.ceil(width / factor))
    m = ds.dataset_mask(out_shape=shape, resampling=Resampling.average) > 0  # type: ignore[attr-defined]
    return m, height / shape[0]


def chip_scene(scene: Sample, size: int, stride: int) -> list[Sample]:
    """Chips of one scene that hold at least one valid pixel."""
    import rasterio

    with rasterio.open(scene.images[0]) as ds:
        windows = chip_windows(ds.height, ds.width, size, stride)
        preview, factor = valid_preview(ds)
    chips = []
    for win in windows:
        r, c, h, w = win
        r0, c0 = int(r / factor), int(c / factor)
        r1, c1 = math.ceil((r + h) / factor), math.ceil((c + w) / factor)
        if preview[r0:r1, c0:c1].any():
            chips.append(Sample(images=scene.images, mask=scene.mask, window=win, label=scene.label,
                                times=scene.times, location=scene.location))
    return chips


def chip_scenes(scenes: Sequence[Sample], *, img_size: int, stride: int) -> list[Sample]:
    """All chips of all scenes, scene by scene in listing order."""
    chips: list[Sample] = []
    for scene in scenes:
        chips.extend(chip_scene(scene, img_size, stride))
    return chips
