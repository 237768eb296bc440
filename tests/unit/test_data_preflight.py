"""The data preflight: missing paths, samples read on the driver, warnings for what training would skip."""

from __future__ import annotations

import numpy as np
import pytest

from encdec.config import DataSection
from encdec.data.preflight import preflight
from encdec.data.synthetic import write_raster, write_tiles

SIZE = 32
HLS = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")


def _cfg(train, **kw):
    return DataSection.model_validate({"train": train, "img_size": SIZE, "global_batch_size": 2, **kw})


def test_missing_paths_are_errors(tmp_path):
    r = preflight(_cfg({"tiles": str(tmp_path / "nothere")}, val={"manifest": str(tmp_path / "m.csv")}))
    assert len(r.errors) == 2
    assert "data.train.tiles=" in r.errors[0] and "matches no files" in r.errors[0]
    assert "data.val.manifest=" in r.errors[1]
    r = preflight(_cfg({"image_root": str(tmp_path), "image_glob": "*_S2Hand.tif"}))
    assert "data.train.image_root=" in r.errors[0]
    assert preflight(_cfg({"tiles": str(tmp_path / "nothere")}), skip=["train"]).errors == []  # e.g. synthetic


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_sampled_tiles_warn_for_what_training_would_skip(tmp_path):
    root = write_tiles(tmp_path / "t", 6, img_size=SIZE, seed=1, cog=False)
    write_raster(root / "tile_00000_img.tif", np.full((6, SIZE, SIZE), -9999, np.int16), nodata=-9999,
                 descriptions=HLS)
    write_raster(root / "tile_00005_mask.tif", np.zeros((1, 40, 40), np.uint8))  # mask size differs from image
    r = preflight(_cfg({"tiles": str(root)}))
    assert r.errors == [] and r.samples == {"train": 6}
    assert r.details["train"]["read"] == 6 and r.details["train"]["dtypes"] == ["int16"]
    text = "\n".join(r.warnings)
    assert "1 of 6 sampled tiles would be skipped as bad" in text and "tile_00005_mask.tif: mask-mismatch" in text
    assert "1 of 6 sampled tiles would be skipped as empty" in text and "tile_00000_img.tif: all-nodata" in text


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_band_list_that_fits_no_tile_is_an_error(tmp_path):
    root = write_tiles(tmp_path / "t", 4, img_size=SIZE, seed=1, cog=False)
    r = preflight(_cfg({"tiles": str(root)}, bands=["BLUE", "RED_EDGE_1"], means=[0, 0], stds=[1, 1]))
    assert len(r.errors) == 1
    assert "none of the 4 sampled tiles can be used" in r.errors[0] and "RED_EDGE_1" in r.errors[0]
