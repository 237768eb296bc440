"""The synthetic generator: readable GeoTIFF/COG pairs with CRS, band descriptions, nodata; learnable but not
separable by one band; deterministic per seed; fast."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from encdec.config import HLS_BANDS
from encdec.data.synthetic import cog_available, make_scene, write_tiles


def test_tiles_are_georeferenced_cogs_with_band_names(tmp_path):
    root = write_tiles(tmp_path, 2, img_size=300, seed=1)  # > one 256 block: the COG gets an overview
    with rasterio.open(root / "tile_00000_img.tif") as ds:
        assert ds.count == 6 and ds.dtypes[0] == "int16" and ds.nodata == -9999
        assert ds.descriptions == HLS_BANDS
        assert ds.crs.to_epsg() // 100 == 326 and ds.transform.a == 30.0
        assert ds.tags()["ACQUISITION_DATE"][:2] == "20"
        if cog_available():
            assert ds.overviews(1) == [2]
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        px = ds.read()
    with rasterio.open(root / "tile_00000_mask.tif") as ms:
        mask = ms.read(1)
        assert ms.crs == ds.crs and ms.transform == ds.transform and ms.nodata == -1
    valid = px[0] != -9999
    assert set(np.unique(mask).tolist()) <= {-1, 0, 1}
    assert (mask[~valid] == -1).all()
    assert (px[:, valid] > 0).all() and (px[:, valid] <= 10000).all()


def test_same_seed_same_tiles_other_seed_other_tiles():
    a = make_scene(np.random.default_rng([0, 1]), 64)
    b = make_scene(np.random.default_rng([0, 1]), 64)
    c = make_scene(np.random.default_rng([1, 1]), 64)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def _pixels(n=16, size=64, task="flood"):
    xs, ys = [], []
    for i in range(n):
        img, mask = make_scene(np.random.default_rng([7, i]), size, task=task)
        keep = mask >= 0
        xs.append(img[:, keep].T.astype(np.float64))
        ys.append(mask[keep])
    return np.concatenate(xs), np.concatenate(ys)


def _best_threshold_miou(values, y):
    """Best 2-class mIoU of ``values < t`` or ``values >= t`` over every threshold t (vectorised)."""
    order = np.argsort(values, kind="stable")
    ys = y[order].astype(np.int64)
    n, pos = len(ys), ys.sum()
    below_pos = np.concatenate([[0], np.cumsum(ys)])  # water among the k lowest values
    k = np.arange(n + 1)
    best = 0.0
    for water_below in (True, False):
        tp = below_pos if water_below else pos - below_pos  # predicted water = below (or above) the cut
        pred_pos = k if water_below else n - k
        tn = (n - pred_pos) - (pos - tp)
        iou1 = tp / np.maximum(pred_pos + pos - tp, 1)
        iou0 = tn / np.maximum((n - pred_pos) + (n - pos) - tn, 1)
        best = max(best, float(((iou0 + iou1) / 2).max()))
    return best


def test_water_is_not_separable_by_one_band_but_is_by_all_six():
    x, y = _pixels()
    assert 0.05 < y.mean() < 0.4  # water is a minority class, present in quantity
    best_single = max(_best_threshold_miou(x[:, band], y) for band in range(6))
    # A linear model on log-reflectances of all bands (a few steps of logistic regression).
    f = np.log(x)
    f = (f - f.mean(0)) / f.std(0)
    f = np.concatenate([f, np.ones((len(f), 1))], axis=1)
    w = np.zeros(f.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-f @ w))
        w -= 1.0 * f.T @ (p - y) / len(y)
    multi = _best_threshold_miou(f @ w, y)
    assert best_single < 0.88, best_single
    assert multi > 0.95, multi
    assert multi - best_single > 0.08


def test_landcover_and_multitemporal(tmp_path):
    img, mask = make_scene(np.random.default_rng(3), 64, task="landcover", num_frames=3)
    assert img.shape == (18, 64, 64) and set(np.unique(mask).tolist()) <= {-1, 0, 1, 2, 3, 4}
    root = write_tiles(tmp_path, 1, img_size=32, num_frames=2, manifest=True, cog=False)
    with rasterio.open(root / "tile_00000_img.tif") as ds:
        assert ds.count == 12 and ds.descriptions == HLS_BANDS * 2
    header, row = (root / "manifest.csv").read_text().splitlines()
    assert header == "image,mask,time,lat,lon" and row.count("|") == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="task='floods'"):
        write_tiles("/nonexistent", 1, task="floods")
    with pytest.raises(TypeError, match="unknown options"):
        write_tiles("/nonexistent", 1, colour=True)
