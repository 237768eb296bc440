"""CLI bodies: make-data writes train/val tile sets a recipe can use; stats prints recipe-form statistics."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml

from encdec.config import DataSection
from encdec.data import build_iterator
from encdec.data.commands import make_data, stats


def test_make_data_then_stats_then_iterate(tmp_path, capsys):
    assert make_data([str(tmp_path / "d"), "--tiles", "4", "--val-tiles", "2", "--img-size", "32", "--no-cog"]) == 0
    assert len(list((tmp_path / "d" / "train").glob("*_img.tif"))) == 4
    assert len(list((tmp_path / "d" / "val").glob("*_mask.tif"))) == 2
    capsys.readouterr()
    assert stats([str(tmp_path / "d" / "train"), "--no-progress", "--out", str(tmp_path / "s.yaml")]) == 0
    result = yaml.safe_load((tmp_path / "s.yaml").read_text())
    means, stds = result["data"]["means"], result["data"]["stds"]
    assert len(means) == len(stds) == 6 and all(200 < m < 5000 for m in means) and all(s > 0 for s in stds)
    assert abs(sum(result["class_frequencies"].values()) - 1) < 1e-3 and len(result["loss"]["class_weights"]) == 2
    cfg = {"train": {"tiles": str(tmp_path / "d" / "train")}, "img_size": 32, "global_batch_size": 2,
           **result["data"]}
    batch = next(build_iterator(DataSection.model_validate(cfg)))
    valid = batch["mask"] >= 0
    # Normalised with its own statistics, the valid pixels are centred near 0 with unit-ish spread.
    assert abs(batch["image"].permute(1, 0, 2, 3)[:, valid].mean().item()) < 0.6


def test_stats_by_index_and_errors(tmp_path, capsys):
    make_data([str(tmp_path / "d"), "--tiles", "2", "--img-size", "32", "--no-cog"])
    capsys.readouterr()
    assert stats([str(tmp_path / "d" / "train"), "--bands", "3,RED", "--no-progress"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["bands"] == [3, "RED"]
    assert stats([str(tmp_path / "nothing")]) == 2
    assert "matches no files" in capsys.readouterr().err
    assert make_data([str(tmp_path / "e"), "--tiles", "1", "--img-size", "8"]) == 2


REAL = Path(__file__).resolve().parents[1] / "data" / "real"


def test_stats_on_real_rasters_without_masks_or_band_names(tmp_path, capsys):
    """RGB.byte.tif (no band names, nodata 0 borders) beside an unreadable file: image statistics over all three
    bands by index, nodata excluded, the unreadable file named."""
    import rasterio

    folder = tmp_path / "scenes"
    folder.mkdir()
    shutil.copy(REAL / "RGB.byte.tif", folder / "RGB.byte.tif")
    shutil.copy(REAL / "corrupt.tif", folder / "corrupt.tif")
    assert stats([str(folder), "--no-progress", "--sample", "0"]) == 0
    out = capsys.readouterr()
    result = yaml.safe_load(out.out)
    assert "corrupt.tif" in out.err and "unreadable" in out.err
    assert "image statistics only" in out.out and "loss" not in result
    with rasterio.open(REAL / "RGB.byte.tif") as ds:
        px = ds.read().astype(np.float64)
    valid = (px != 0).all(axis=0)  # nodata 0: a pixel with any band at nodata is left out
    assert 0.2 < 1 - valid.mean() < 0.5, "the fixture has nodata borders"
    assert result["data"]["bands"] == [0, 1, 2]
    np.testing.assert_allclose(result["data"]["means"], px[:, valid].mean(axis=1), atol=0.006)
    np.testing.assert_allclose(result["data"]["stds"], px[:, valid].std(axis=1), atol=0.006)


def test_stats_errors_name_its_own_flags(tmp_path, capsys):
    assert stats([str(REAL / "RGB.byte.tif"), "--bands", "BLUE", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--bands" in err and "'BLUE'" in err and "data.bands" not in err
    assert stats([str(REAL / "RGB.byte.tif"), "--bands", "0,5", "--no-progress"]) == 2
    assert "--bands: band index 5" in capsys.readouterr().err
    assert stats([str(REAL), "--image-suffix", ".jp2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--image-suffix" in err and "image_suffix" not in err and "stats." not in err


def test_stats_recurses_into_make_data_splits_and_warns_on_mask_grid(tmp_path, capsys):
    import rasterio

    assert make_data([str(tmp_path / "d"), "--tiles", "3", "--val-tiles", "2", "--img-size", "32", "--no-cog"]) == 0
    mask = tmp_path / "d" / "val" / "tile_00000_mask.tif"
    with rasterio.open(mask) as src:
        profile, m = src.profile, src.read(1)
    profile.update(width=16, height=16)
    with rasterio.open(mask, "w", **profile) as dst:  # the mask no longer covers its image's grid
        dst.write(m[:16, :16], 1)
    capsys.readouterr()
    assert stats([str(tmp_path / "d"), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "over 5 of 5 tiles" in out.out  # train/ and val/
    result = yaml.safe_load(out.out)
    assert result["data"]["bands"] == ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
    assert len(result["loss"]["class_weights"]) == 2
    assert "tile_00000_mask.tif" in out.err and "size 16x16 vs image 32x32" in out.err
