"""The reader on real rasters from rasterio's test data (``tests/data/real``): a COG, a corrupt COG, and chips of a
Landsat scene whose nodata border makes some chips empty."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encdec.config import DataSection
from encdec.data import build_iterator
from encdec.data.badtiles import BadTileError
from encdec.data.build import make_reader
from encdec.data.sources import Sample

REAL = Path(__file__).resolve().parents[1] / "data" / "real"


def _cfg(**kw):
    return {"train": {"scenes": str(REAL / "RGB.byte.tif"), "mask_suffix": None, "image_suffix": ".tif"},
            "bands": [0, 1, 2], "means": [50.0, 50.0, 50.0], "stds": [30.0, 30.0, 30.0], "img_size": 64,
            "global_batch_size": 4, **kw}


def test_cog_and_corrupt_cog():
    reader = make_reader(DataSection.model_validate(_cfg()))
    out = np.empty((3, 64, 64), np.float32)
    result = reader.read(Sample(images=(str(REAL / "cogeo.tif"),), window=(512, 512, 64, 64)), out, None)
    assert result.valid_fraction == 1.0 and np.isfinite(out).all() and out.std() > 0
    with pytest.raises(BadTileError, match="unreadable"):
        reader.read(Sample(images=(str(REAL / "corrupt.tif"),), window=(512, 512, 64, 64)), out, None)


def test_landsat_chips_with_nodata_borders_are_empty_not_bad():
    cfg = _cfg(max_bad_fraction=0.0, min_valid_fraction=0.25)
    cfg["val"] = cfg["train"]
    it = build_iterator(DataSection.model_validate(cfg), split="val")
    ids = [i for b in it for i in b["sample_id"].tolist() if i >= 0]
    n = len(it.loader.samples)  # chips of 64 px over the 718 x 791 scene; all-nodata ones are dropped when listed
    skipped = it.bad_tiles
    assert n < 12 * 13 and skipped["total"] == 0  # nothing bad, with max_bad_fraction=0
    assert skipped["empty"] == skipped["nearly-empty"] == n - len(ids) > 0  # border chips under 25% valid
