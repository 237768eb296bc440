"""The ``data:`` section the pipeline receives (``encdec.config.DataSection``: defaults, statistics, errors that
name the field) and the import weight of encdec.data."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from encdec.config import HLS_MEANS, HLS_STDS, DataSection


def _data(**kw):
    return DataSection.model_validate({"train": {"tiles": "/t"}, "global_batch_size": 8, **kw})


def test_defaults_follow_the_recipe_and_hls_statistics():
    spec = _data()
    assert spec.stats() == (HLS_MEANS, HLS_STDS) and spec.img_size == 224 and spec.num_frames == 1
    train = spec.split("train")
    assert train is not None and train.tile_paths == ("/t",) and spec.split("val") is None
    assert spec.reader.threads == 4 and spec.reader.prefetch_batches == 2 and spec.max_bad_fraction == 0.01
    assert not spec.augment.any and not spec.location_coords and spec.feed == "reader"
    lower = _data(bands=["blue", "green", "red", "nir_narrow", "swir_1", "swir_2"])
    assert lower.stats()[0] == HLS_MEANS
    assert _data(bands=[0, 1], means=[1, 2], stds=[3, 4]).stats() == ((1.0, 2.0), (3.0, 4.0))
    with pytest.raises(ValueError, match=r"data\.means/data\.stds are missing.*encdec-launch stats"):
        _data(bands=["RED"]).stats()


@pytest.mark.parametrize(("cfg", "match"), [
    ({"bands": []}, r"bands\n\s+List should have at least 1 item"),
    ({"bands": ["RED", -1]}, r"bands\n\s+band indexes are 0-based"),
    ({"means": [1, 2]}, r"data\.means has 2 values but data\.bands has 6"),
    ({"stds": [1, 1, 1, 1, 1, 0]}, r"data\.stds must all be > 0"),
    ({"img_size": 0}, r"img_size\n\s+Input should be greater than or equal to 8"),
    ({"global_batch_size": "eight"}, r"global_batch_size\n\s+Input should be a valid integer"),
    ({"max_bad_fraction": 2}, r"max_bad_fraction\n\s+Input should be less than or equal to 1"),
    ({"augment": {"flip": True}}, r"augment\.flip\n\s+Extra inputs are not permitted"),
    ({"reader": {"threads": 0}}, r"reader\.threads\n\s+Input should be greater than or equal to 1"),
    ({"shuffle": True}, r"shuffle\n\s+Extra inputs are not permitted"),
    ({"train": {"tiles": "/d", "manifest": "m.csv"}}, r"give exactly one of 'tiles', 'manifest', 'scenes' or 'image_root'"),
    ({"train": {"scenes": "/d", "stride": 0}}, r"train\.stride\n\s+Input should be greater than or equal to 1"),
    ({"feed": "spark"}, r"feed\n\s+Input should be 'reader' or 'ray'"),
])
def test_errors_name_the_field(cfg, match):
    with pytest.raises(ValidationError, match=match):
        _data(**cfg)


def test_importing_encdec_data_loads_neither_rasterio_nor_ray():
    code = ("import sys, encdec, encdec.data, encdec.data.synthetic, encdec.data.ray_feed, encdec.data.commands; "
            "print(sorted(m for m in ('rasterio', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
