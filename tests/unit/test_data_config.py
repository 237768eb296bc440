"""The data: section parser (defaults, typed errors naming the field) and the import weight of encdec.data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from encdec.data.config import HLS_MEANS, DataConfigError, parse_data_config


def test_defaults_follow_the_recipe_and_hls_statistics():
    spec = parse_data_config({"train": "/tiles", "global_batch_size": 8})
    assert spec.means == HLS_MEANS and spec.img_size == 224 and spec.num_frames == 1
    assert spec.splits["train"].tiles == ("/tiles",) and spec.splits["train"].split == "train"
    assert spec.reader.threads == 4 and spec.reader.prefetch_batches == 2 and spec.max_bad_fraction == 0.01
    assert not spec.augment.any and not spec.location_coords
    assert parse_data_config({"train": "/t", "feed": "ray"}).splits["train"].tiles == ("/t",)  # key accepted
    lower = parse_data_config({"train": "/t", "bands": ["blue", "green", "red", "nir_narrow", "swir_1", "swir_2"]})
    assert lower.means == HLS_MEANS


@pytest.mark.parametrize(("cfg", "match"), [
    ({"bands": []}, r"data\.bands"),
    ({"bands": ["RED", -1]}, r"data\.bands"),
    ({"means": [1, 2]}, r"data\.means"),
    ({"stds": [1, 1, 1, 1, 1, 0]}, r"data\.stds"),
    ({"img_size": 0}, r"data\.img_size=0"),
    ({"global_batch_size": "8"}, r"data\.global_batch_size='8'"),
    ({"max_bad_fraction": 2}, r"data\.max_bad_fraction=2"),
    ({"augment": {"flip": True}}, r"data\.augment has unknown key"),
    ({"reader": {"threads": 0}}, r"data\.reader\.threads=0"),
    ({"shuffle": True}, r"data has unknown key\(s\) \['shuffle'\]"),
    ({"train": 5}, r"data\.train=5"),
])
def test_errors_name_the_field_and_the_fix(cfg, match):
    with pytest.raises(DataConfigError, match=match) as e:
        parse_data_config({"train": "/t", **cfg})
    assert "Fix" in str(e.value) or "allowed" in str(e.value)


def test_importing_encdec_data_loads_neither_rasterio_nor_ray():
    code = ("import sys, encdec, encdec.data, encdec.data.synthetic, encdec.data.ray_feed, encdec.data.commands; "
            "print(sorted(m for m in ('rasterio', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
