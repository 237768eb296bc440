"""Tiny models and rasters for the predict tests (seeded, CPU, milliseconds)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TinyFCN(nn.Module):
    """Two 3x3 convolutions: receptive field 5x5 (radius 2), smaller than any delta >= 2 used in the tests."""

    def __init__(self, in_ch: int = 3, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, classes, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


def write_scene(path: Path, data: np.ndarray, *, nodata: float | None = None, crs: str | None = "EPSG:32633",
                blocksize: int | None = None) -> Path:
    """A GeoTIFF of ``data`` [C, H, W] with a UTM CRS and 30 m pixels."""
    import rasterio
    from rasterio.transform import from_origin

    kw: dict[str, object] = {}
    if blocksize:
        kw = {"tiled": True, "blockxsize": blocksize, "blockysize": blocksize}
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=from_origin(500000.0, 4600000.0, 30.0, 30.0),
                       nodata=nodata, **kw) as dst:
        dst.write(data)
    return path


def random_scene(c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(c, h, w)).astype(np.float32)


class SeededFCN(nn.Module):
    """Identical to the model in fixtures/make_terratorch_tiled.py (same layers, same seeded weights)."""

    def __init__(self, in_ch: int = 3, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, classes, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def tiled_logits(model: nn.Module, path: Path, tiled: dict, *, strip_rows: int = 2048,
                 read_threads: int = 1, read_cache_mb: int = 128) -> np.ndarray:
    """Our tiled predictor's blended outputs [K, H, W] for a scene (all strips, through the engine's sink)."""
    import rasterio

    from encdec.predict.engine import run_strip
    from encdec.predict.runner import make_forward, make_preprocess
    from encdec.predict.scenes import open_scene
    from encdec.predict.windows import TiledParams, plan_windows

    scene = open_scene(str(path))
    plan = plan_windows(scene.height, scene.width, TiledParams(**tiled), strip_rows=strip_rows)
    forward = make_forward(model, device="cpu")
    rows: dict[int, np.ndarray] = {}

    def sink(row: int, values: np.ndarray, valid: np.ndarray) -> None:
        for i in range(values.shape[1]):
            assert row + i not in rows, f"row {row + i} emitted twice"
            rows[row + i] = values[:, i]

    with rasterio.open(path) as src:
        for strip in plan.strips:
            run_strip(src, scene, plan, strip, forward, make_preprocess(None, None, scene.nodata), sink,
                      queue_windows=4, read_threads=read_threads, open_src=lambda: rasterio.open(path),
                      read_cache_mb=read_cache_mb)
    assert sorted(rows) == list(range(scene.height))
    return np.stack([rows[r] for r in range(scene.height)], axis=1)


class DiesOnceMixin(nn.Module):
    """Kills its worker process (os._exit, as the OOM killer would) on forward number ``die_at``, once per marker
    file; put it before a model class: ``class X(DiesOnceMixin, Model)``."""

    die_at = 3

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.die_at and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().forward(x)  # type: ignore[no-any-return]


class DiesOnce(DiesOnceMixin, TinyFCN):
    """:class:`TinyFCN` that kills its worker on the 3rd forward, once per marker file."""
