"""Scalar tasks through predict: per-window and per-scene tables (CSV, and Parquet with pyarrow) whose values are
the model on each window, with the window's place in the scene and on the map."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window, bounds

import encdec
from tests.unit._predict_models import random_scene, write_scene
from tests.unit._predict_scalar_models import TinyScalar

TILED = {"crop": 32, "stride": 32, "delta": 0, "batch_size": 3}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_classification_writes_one_row_per_window_and_per_scene(tmp_path: Path) -> None:
    data = random_scene(3, 70, 50, seed=2)
    data[:, 38:, 18:] = -9999  # the bottom-right window is all nodata
    path = write_scene(tmp_path / "field.tif", data, nodata=-9999)
    model = TinyScalar()
    res = encdec.predict(model, [path], tmp_path / "out", task="classification", tiled=TILED,
                         class_names=["crop", "forest"])
    assert not res.failed and res.windows == 6
    rows = _rows(tmp_path / "out" / "windows.csv")
    assert [(int(r["row"]), int(r["col"])) for r in rows] == [(0, 0), (0, 18), (32, 0), (32, 18), (38, 0), (38, 18)]
    with rasterio.open(path) as src:
        transform = src.transform
    with torch.no_grad():
        for r in rows:
            y, x = int(r["row"]), int(r["col"])
            win = torch.from_numpy(np.where(data == -9999, 0, data)[None, :, y: y + 32, x: x + 32])
            p = torch.softmax(model(win)[0], 0).numpy()
            got = np.array([float(r[f"p_{n}"]) for n in ("crop", "forest", "class 2", "class 3")])
            assert (float(r["left"]), float(r["bottom"]), float(r["right"]), float(r["top"])) == pytest.approx(
                bounds(Window(x, y, 32, 32), transform))
            if (y, x) == (38, 18):
                assert float(r["valid_fraction"]) == 0 and r["class"] == "" and np.isnan(got).all()
                continue
            np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-6)
            assert int(r["class"]) == int(p.argmax()) and math.isclose(got.sum(), 1, abs_tol=1e-5)
            assert r["class_name"] == ["crop", "forest", "class 2", "class 3"][int(r["class"])]
    [scene] = _rows(tmp_path / "out" / "scenes.csv")
    assert (scene["windows"], scene["valid_windows"]) == ("6", "5")
    mean = np.mean([[float(r["p_crop"]), float(r["p_forest"])] for r in rows[:5]], axis=0)
    assert (float(scene["p_crop"]), float(scene["p_forest"])) == pytest.approx(tuple(mean))
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(tmp_path / "out" / "windows.parquet").to_pylist()
    assert len(table) == 6 and table[0]["class"] == int(rows[0]["class"])
    assert set(res.tables) == {"windows.csv", "scenes.csv", "windows.parquet", "scenes.parquet"}


def test_scalar_regression_on_a_scene_smaller_than_a_window(tmp_path: Path) -> None:
    data = random_scene(3, 20, 26, seed=5)
    path = write_scene(tmp_path / "plot.tif", data)
    other = write_scene(tmp_path / "two_bands.tif", data[:2])
    model = TinyScalar(k=0)
    res = encdec.predict(model, [path, other], tmp_path / "out", task="scalar_regression", tiled=TILED)
    assert list(res.failed) == [str(other)]  # listed, the other scene written
    [row] = _rows(tmp_path / "out" / "windows.csv")
    assert (row["height"], row["width"]) == ("20", "26")
    padded = np.pad(data, ((0, 0), (0, 12), (0, 6)), mode="reflect")  # to one window, as the tiled path pads
    with torch.no_grad():
        want = float(model(torch.from_numpy(padded)[None])[0])
    assert float(row["value"]) == pytest.approx(want, rel=1e-5)
    [scene] = _rows(tmp_path / "out" / "scenes.csv")
    assert float(scene["value"]) == pytest.approx(want, rel=1e-5)
