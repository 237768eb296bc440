"""Multi-temporal scenes as in training: one file per date (``d1.tif|d2.tif|d3.tif``, also in a manifest) or
the dates as band groups of one file; both are preprocessed by ``encdec.data.preprocess`` into ``[C, T, H, W]``
windows and give the same output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch import nn

import encdec
from encdec.config import DataSection
from tests.unit._predict_models import write_scene

BANDS = ["RED", "NIR"]
TILED = {"crop": 32, "stride": 24, "delta": 4, "batch_size": 4}


class TinyTemporal(nn.Module):
    """``[B, C, T, H, W] -> [B, K, H, W]``: the frames stacked as channels, one 3x3 convolution (seeded)."""

    def __init__(self, channels: int = 2, frames: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.frames = frames
        self.conv = nn.Conv2d(channels * frames, classes, 3, padding=1)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != self.frames:
            raise ValueError(f"expected [B, C, {self.frames}, H, W], got {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        return self.conv(x.reshape(b, c * t, h, w))


def _data(tmp_path: Path, frames: int) -> DataSection:
    return DataSection.model_validate({"train": {"tiles": str(tmp_path)}, "global_batch_size": 1, "bands": BANDS,
                                       "means": [100.0, 200.0], "stds": [50.0, 60.0], "img_size": 32,
                                       "num_frames": frames})


def _dates(tmp_path: Path, frames: int, h: int, w: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    dates = [rng.integers(0, 400, size=(2, h, w)).astype(np.int16) for _ in range(frames)]
    dates[1][:, :5, :7] = -9999  # nodata in one date only: nodata in the output
    return dates


def _write(path: Path, data: np.ndarray, names: list[str]) -> Path:
    write_scene(path, data, nodata=-9999)
    with rasterio.open(path, "r+") as f:
        for i, n in enumerate(names, start=1):
            f.set_band_description(i, n)
    return path


@pytest.mark.parametrize("frames", [2, 3])
def test_one_file_per_date_equals_band_groups(tmp_path: Path, frames: int) -> None:
    dates = _dates(tmp_path, frames, 70, 45)
    files = [_write(tmp_path / f"scene_d{i}.tif", d, BANDS) for i, d in enumerate(dates)]
    grouped = _write(tmp_path / "grouped.tif", np.concatenate(dates), BANDS * frames)
    model, data = TinyTemporal(frames=frames), _data(tmp_path, frames)
    per_date = encdec.predict(model, ["|".join(map(str, files))], tmp_path / "a", data=data, tiled=TILED,
                              quicklook=False)
    one_file = encdec.predict(model, [grouped], tmp_path / "b", data=data, tiled=TILED, quicklook=False)
    assert not per_date.failed and not one_file.failed, (per_date.failed, one_file.failed)
    with rasterio.open(tmp_path / "a" / "scene_d0.tif") as a, rasterio.open(tmp_path / "b" / "grouped.tif") as b:
        pa, pb = a.read(1), b.read(1)
        assert (a.crs, a.transform, a.shape) == (b.crs, b.transform, (70, 45))
    np.testing.assert_array_equal(pa, pb)
    assert (pa[:5, :7] == 255).all() and (pa[5:] != 255).all()  # nodata of date 2 propagates
    assert len(np.unique(pa[5:])) > 1
    # the order of the dates matters to the model: swapping two dates changes the map
    swapped = [files[1], files[0], *files[2:]]
    encdec.predict(model, ["|".join(map(str, swapped))], tmp_path / "c", data=data, tiled=TILED, quicklook=False)
    with rasterio.open(tmp_path / "c" / "scene_d1.tif") as c:
        assert (c.read(1)[5:] != pa[5:]).any()


def test_a_window_sized_scene_is_the_model_on_the_preprocessed_stack(tmp_path: Path) -> None:
    from encdec.data.preprocess import preprocess

    dates = _dates(tmp_path, 3, 32, 32)
    files = [_write(tmp_path / f"s_d{i}.tif", d, BANDS) for i, d in enumerate(dates)]
    model, data = TinyTemporal(frames=3), _data(tmp_path, 3)
    manifest = tmp_path / "scenes.txt"
    manifest.write_text("|".join(f.name for f in files) + "\n")  # relative to the manifest, one line per scene
    res = encdec.predict(model, [manifest], tmp_path / "out", data=data, tiled=TILED, task="regression",
                         quicklook=False)
    assert not res.failed, res.failed
    x, valid = preprocess(np.concatenate(dates), data, descriptions=BANDS * 3, nodata=-9999)
    with torch.no_grad():
        want = model(torch.from_numpy(x)[None])[0, 0].numpy()
    with rasterio.open(tmp_path / "out" / "s_d0.tif") as f:
        got = f.read(1)
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-6, atol=1e-6)
    assert np.isnan(got[~valid]).all() and (~valid).sum() == 35


def test_wrong_number_of_dates_is_listed_with_the_fix(tmp_path: Path) -> None:
    dates = _dates(tmp_path, 2, 40, 40)
    files = [_write(tmp_path / f"w_d{i}.tif", d, BANDS) for i, d in enumerate(dates)]
    other = write_scene(tmp_path / "other_grid.tif", dates[0][:, :30], nodata=-9999)
    res = encdec.predict(TinyTemporal(frames=3), ["|".join(map(str, files)), f"{files[0]}|{other}|{files[1]}"],
                         tmp_path / "out", data=_data(tmp_path, 3), tiled=TILED, quicklook=False)
    assert len(res.failed) == 2 and not res.outputs
    two, grid = res.failed.values()
    assert "2 files (dates)" in two and "num_frames=3" in two and "Fix" in two
    assert "other_grid.tif" in grid and "size" in grid and "gdalwarp" in grid
