"""Scene chipping: window counts, stride, edge padding, nodata-only chips dropped, chips through the feed."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from encdec.config import DataSection
from encdec.data import build_iterator
from encdec.data import chips as chipmod
from encdec.data.chips import chip_scene, chip_windows
from encdec.data.sources import Sample
from encdec.data.synthetic import HLS_BANDS, write_raster

GEO = {"crs": "EPSG:32633", "transform": Affine(30, 0, 400000, 0, -30, 5000000)}


@pytest.mark.parametrize(("h", "w", "size", "stride", "n"), [
    (64, 64, 32, 32, 4), (65, 64, 32, 32, 6), (32, 32, 32, 32, 1), (20, 20, 32, 32, 1), (64, 64, 32, 16, 9),
    (100, 40, 32, 24, 4 * 2),
])
def test_chip_counts(h, w, size, stride, n):
    wins = chip_windows(h, w, size, stride)
    assert len(wins) == n
    covered = np.zeros((h, w), bool)
    for r, c, hh, ww in wins:
        covered[r:r + hh, c:c + ww] = True
    assert covered.all()


def _scene(tmp_path, h=100, w=70):
    px = np.random.default_rng(0).integers(100, 3000, (6, h, w)).astype(np.int16)
    px[:, :40, :] = -9999  # top 40 rows: nodata
    write_raster(tmp_path / "s_img.tif", px, nodata=-9999, descriptions=HLS_BANDS, **GEO)
    write_raster(tmp_path / "s_mask.tif", (px[:1] > 1500).astype(np.int16), nodata=-1, **GEO)
    return px


@pytest.mark.parametrize("preview", [1024, 10])
def test_nodata_only_chips_are_dropped(tmp_path, monkeypatch, preview):
    monkeypatch.setattr(chipmod, "MASK_PREVIEW", preview)  # 10 forces the decimated (overview) path
    _scene(tmp_path)
    chips = chip_scene(Sample(images=(str(tmp_path / "s_img.tif"),)), 32, 16)
    rows = sorted({c.window[0] for c in chips})
    # Window rows start at 0, 16, ..., 80; the row-0 windows cover only nodata rows 0..31 and are dropped,
    # the row-16 ones reach valid rows 40..47 and stay.
    assert rows == [16, 32, 48, 64, 80]
    assert len(chips) == 5 * len(chip_windows(100, 70, 32, 16)) // 6


def test_chips_through_the_feed_are_padded_and_exact(tmp_path):
    px = _scene(tmp_path)
    cfg = {"train": {"scenes": str(tmp_path), "stride": 32}, "val": {"scenes": str(tmp_path), "stride": 32},
           "img_size": 32, "global_batch_size": 2, "means": [0] * 6, "stds": [1] * 6}
    batches = list(build_iterator(DataSection.model_validate(cfg), split="val"))
    ids = [i for b in batches for i in b["sample_id"].tolist() if i >= 0]
    assert ids == list(range(len(ids))) and len(ids) == 3 * 3  # rows 32, 64, 96(padded) x cols 0, 32, 64(padded)
    first = batches[0]
    # chip (32, 0): rows 32..39 are nodata -> image 0, mask -1; rows 40.. hold the pixels
    np.testing.assert_array_equal(first["image"][0, :, 8:].numpy(), px[:, 40:64, 0:32].astype(np.float32))
    assert (first["mask"][0, :8] == -1).all() and (first["image"][0, :, :8] == 0).all()
    last = batches[-1]["image"][0]  # chip (96, 64): 4 rows x 6 cols inside, the rest padded
    np.testing.assert_array_equal(last[:, :4, :6].numpy(), px[:, 96:100, 64:70].astype(np.float32))
    assert (last[:, 4:] == 0).all() and (last[:, :, 6:] == 0).all()
