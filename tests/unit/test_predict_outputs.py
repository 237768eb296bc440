"""predict end to end in one process: georeferenced COG outputs, nodata, probabilities, resume, bad scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import encdec
from tests.unit._predict_models import TinyFCN, random_scene, write_scene

TILED = {"crop": 32, "stride": 24, "delta": 4, "batch_size": 4}


def _full(model: torch.nn.Module, data: np.ndarray, delta: int = 4) -> np.ndarray:
    x = torch.nn.functional.pad(torch.from_numpy(data)[None], (delta,) * 4, mode="reflect")
    with torch.no_grad():
        return model(x)[0, :, delta:-delta, delta:-delta].numpy()


def test_regression_output_is_georeferenced_like_the_input_and_exact(tmp_path: Path) -> None:
    data = random_scene(3, 70, 45, seed=1)
    scene = write_scene(tmp_path / "a.tif", data)
    model = TinyFCN(classes=1).eval()
    res = encdec.predict(model, scene, tmp_path / "out", task="regression", tiled=TILED, strip_rows=30)
    assert not res.failed and res.windows > 0
    out = res.outputs[str(scene)]["pred"]
    with rasterio.open(scene) as src, rasterio.open(out) as dst:
        assert (dst.crs, dst.transform, dst.shape) == (src.crs, src.transform, src.shape)
        assert dst.dtypes[0] == "float32" and dst.profile["compress"].lower() == "deflate"
        assert dst.profile["tiled"] and dst.tags()["tiled_delta"] == "4" and dst.tags()["task"] == "regression"
        got = dst.read(1)
    assert np.abs(got - _full(model, data)[0]).max() <= 1e-5
    assert res.outputs[str(scene)]["png"].stat().st_size > 1000


def test_nodata_propagates_and_probabilities_sum_to_one(tmp_path: Path) -> None:
    data = (random_scene(3, 60, 50, seed=2) * 100 + 1000).astype(np.int16)
    data[:, 10:20, 5:15] = -9999
    data[1, 40, 40] = -9999  # one band's nodata is enough
    scene = write_scene(tmp_path / "n.tif", data, nodata=-9999)
    res = encdec.predict(TinyFCN(), [str(tmp_path)], tmp_path / "out", tiled=TILED, means=[1000] * 3,
                         stds=[100] * 3, probabilities="float16", class_names=["water", "land", "cloud"])
    paths = res.outputs[str(scene)]
    invalid = (data == -9999).any(axis=0)
    with rasterio.open(paths["pred"]) as f:
        cls = f.read(1)
        assert f.nodata == 255 and json.loads(f.tags()["class_names"]) == ["water", "land", "cloud"]
    with rasterio.open(paths["prob"]) as f:
        prob = f.read()
        assert f.descriptions == ("p(water)", "p(land)", "p(cloud)")
    assert ((cls == 255) == invalid).all()
    assert np.isnan(prob[:, invalid]).all()
    sums = prob[:, ~invalid].sum(axis=0)
    assert np.abs(sums - 1).max() < 3e-3  # float16 values
    assert (prob[:, ~invalid].argmax(axis=0) == cls[~invalid]).mean() > 0.99  # ties after float16 rounding


def test_uint8_probabilities(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "u.tif", random_scene(3, 40, 40, seed=3))
    res = encdec.predict(TinyFCN(), scene, tmp_path / "out", tiled=TILED, probabilities=True)
    with rasterio.open(res.outputs[str(scene)]["prob"]) as f:
        p = f.read().astype(np.int64)
    assert np.abs(p.sum(axis=0) - 254).max() <= 2  # round(p * 254) per class


def test_finished_scenes_are_skipped_unless_overwrite(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "r.tif", random_scene(3, 40, 50, seed=4))
    out = tmp_path / "out"
    first = encdec.predict(TinyFCN(), scene, out, tiled=TILED)
    mtime = first.outputs[str(scene)]["pred"].stat().st_mtime_ns
    again = encdec.predict(TinyFCN(), scene, out, tiled=TILED)
    assert again.skipped_done == [str(scene)] and again.windows == 0
    assert first.outputs[str(scene)]["pred"].stat().st_mtime_ns == mtime
    redo = encdec.predict(TinyFCN(), scene, out, tiled=TILED, overwrite=True)
    assert redo.windows == first.windows and not (out / ".parts" / "r").exists()


def test_strips_written_before_a_crash_are_reused(tmp_path: Path) -> None:
    from encdec.predict.outputs import parts_dir

    one = {**TILED, "batch_size": 1}  # one window per forward: the crash lands mid-scene
    scene = write_scene(tmp_path / "k.tif", random_scene(3, 90, 40, seed=5))
    ref = encdec.predict(TinyFCN(), scene, tmp_path / "ref", tiled=one, strip_rows=24, quicklook=False)

    calls = {"n": 0}

    class Dies(TinyFCN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError("worker lost")
            return super().forward(x)

    out = tmp_path / "out"
    crashed = encdec.predict(Dies(), scene, out, tiled=one, strip_rows=24, quicklook=False)
    assert str(scene) in crashed.failed and not (out / "k.tif").exists()
    info = _info(scene)
    assert list(parts_dir(out, info).glob("*.done")), "the first strip should be complete"
    resumed = encdec.predict(TinyFCN(), scene, out, tiled=one, strip_rows=24, quicklook=False)
    assert 0 < resumed.windows < ref.windows  # only unfinished strips were recomputed
    assert (out / "k.tif").read_bytes() == ref.outputs[str(scene)]["pred"].read_bytes()


def _info(path: Path):
    from encdec.predict.scenes import open_scene

    return open_scene(str(path))


def test_bad_scenes_are_listed_and_the_others_written(tmp_path: Path) -> None:
    good = write_scene(tmp_path / "good.tif", random_scene(3, 40, 40))
    write_scene(tmp_path / "nocrs.tif", random_scene(3, 40, 40), crs=None)
    write_scene(tmp_path / "twobands.tif", random_scene(2, 40, 40))
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    res = encdec.predict(TinyFCN(), tmp_path, tmp_path / "out", tiled=TILED, expect_bands=3)
    assert set(res.outputs) == {str(good)}
    assert "has no CRS" in res.failed[str(tmp_path / "nocrs.tif")]
    assert "2 bands selected, the model takes 3" in res.failed[str(tmp_path / "twobands.tif")]
    assert "cannot be read as a raster" in res.failed[str(tmp_path / "broken.tif")]


def test_bands_by_name_and_scene_smaller_than_a_window(tmp_path: Path) -> None:
    data = random_scene(4, 9, 13, seed=6)
    path = write_scene(tmp_path / "small.tif", data)
    with rasterio.open(path, "r+") as f:
        for i, name in enumerate(["BLUE", "GREEN", "RED", "NIR"], start=1):
            f.set_band_description(i, name)
    model = TinyFCN(classes=1).eval()
    res = encdec.predict(model, path, tmp_path / "out", task="regression", tiled=TILED, bands=["NIR", "RED", "BLUE"])
    with rasterio.open(res.outputs[str(path)]["pred"]) as f:
        got = f.read(1)
    with torch.no_grad():  # TerraTorch 1.2.11: a scene within one window is one forward of the unpadded scene
        want = model(torch.from_numpy(data[[3, 2, 0]])[None])[0, 0].numpy()
    assert got.shape == (9, 13) and np.abs(got - want).max() <= 1e-5


def test_discovery_of_globs_manifests_and_remote_paths(tmp_path: Path) -> None:
    from encdec.predict.scenes import SceneError, discover_scenes

    a = write_scene(tmp_path / "a.tif", random_scene(1, 4, 4))
    b = write_scene(tmp_path / "b.tif", random_scene(1, 4, 4))
    (tmp_path / "list.txt").write_text("a.tif\n# comment\nb.tif\n")
    (tmp_path / "list.csv").write_text("scene,split\nb.tif,test\n")
    assert discover_scenes([str(tmp_path / "*.tif"), str(tmp_path / "list.txt")]) == [str(a), str(b)]
    assert discover_scenes([tmp_path / "list.csv"]) == [str(b)]
    assert discover_scenes(["s3://bucket/x.tif", "https://h/y.tif"]) == ["/vsis3/bucket/x.tif",
                                                                         "/vsicurl/https://h/y.tif"]
    with pytest.raises(SceneError, match="no scene found for"):
        discover_scenes([str(tmp_path / "nope*.tif")])
