"""Sources: folders, globs, naming rules, CSV and Parquet manifests, splits, times, path handling."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encdec.config import DataSource
from encdec.data.config import DataConfigError
from encdec.data.sources import expand, is_url, join, list_samples, pair_tiles, parse_time


def _touch(root, *names):
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")


def test_folder_and_glob_pair_by_naming_rule(tmp_path):
    _touch(tmp_path, "b_img.tif", "b_mask.tif", "a_img.tif", "a_mask.tif", "notes.txt", "sub/c_img.tif")
    samples = list_samples(DataSource(tiles=str(tmp_path)), img_size=32, where="data.train", split="train")
    assert [os.path.basename(s.images[0]) for s in samples] == ["a_img.tif", "b_img.tif"]
    assert samples[0].mask == str(tmp_path / "a_mask.tif")
    deep = list_samples(DataSource(tiles=[str(tmp_path / "**" / "*.tif")]), img_size=32, where="data.train", split="train")
    assert [os.path.basename(s.images[0]) for s in deep] == ["a_img.tif", "b_img.tif", "c_img.tif"]
    s2 = pair_tiles(["x_S2Hand.tif", "x_LabelHand.tif"], "_S2Hand.tif", "_LabelHand.tif")
    assert s2[0].mask == "x_LabelHand.tif" and len(s2) == 1
    assert pair_tiles(["y.tif"], ".tif", None)[0].mask is None


def test_csv_manifest_with_split_times_relative_paths(tmp_path):
    (tmp_path / "m.csv").write_text(
        "image,mask,split,label,time,lat,lon\n"
        "a.tif,a_m.tif,train,1,2020-03-01|2020-197,10.5,20.25\n"
        "/abs/b.tif,,val,,,,\n"
        "s3://bucket/c.tif,s3://bucket/c_m.tif,train,0,,,\n"
    )
    train = list_samples(DataSource(manifest=str(tmp_path / "m.csv")), img_size=32, where="data.train", split="train")
    assert len(train) == 2
    assert train[0].images == (str(tmp_path / "a.tif"),) and train[0].mask == str(tmp_path / "a_m.tif")
    assert train[0].times == ((2020, 61), (2020, 197)) and train[0].location == (10.5, 20.25)
    assert train[0].label == 1.0 and train[1].images == ("s3://bucket/c.tif",)
    val = list_samples(DataSource(manifest=str(tmp_path / "m.csv")), img_size=32, where="data.val", split="val")
    assert val[0].images == ("/abs/b.tif",) and val[0].mask is None and val[0].times is None


def test_parquet_manifest(tmp_path):
    table = pa.table({"image": ["x.tif|y.tif", "z.tif"], "mask": ["xm.tif", None], "label": [2, 3]})
    pq.write_table(table, tmp_path / "m.parquet")
    samples = list_samples(DataSource(manifest=str(tmp_path / "m.parquet")), img_size=32, where="data.train", split=None)
    assert samples[0].images == (str(tmp_path / "x.tif"), str(tmp_path / "y.tif"))
    assert samples[1].mask is None and samples[1].label == 3.0


def test_manifest_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("path,mask\na.tif,b.tif\n")
    with pytest.raises(DataConfigError, match="no 'image' column"):
        list_samples(DataSource(manifest=str(tmp_path / "bad.csv")), img_size=32, where="data.train", split=None)
    (tmp_path / "t.csv").write_text("image,time\na.tif,yesterday\n")
    with pytest.raises(DataConfigError, match="row 1: time 'yesterday'"):
        list_samples(DataSource(manifest=str(tmp_path / "t.csv")), img_size=32, where="data.train", split=None)
    (tmp_path / "s.csv").write_text("image,split\na.tif,train\n")
    with pytest.raises(DataConfigError, match="no rows for split 'val'"):
        list_samples(DataSource(manifest=str(tmp_path / "s.csv")), img_size=32, where="data.val", split="val")


def test_path_helpers_keep_urls():
    assert is_url("s3://b/k") and is_url("gs://b/k") and not is_url("/data/x")
    assert join("s3://bucket/dir", "a/b.tif") == "s3://bucket/dir/a/b.tif"
    assert join("/data", "gs://b/x.tif") == "gs://b/x.tif"
    assert join("/data/sub", "../x.tif") == "/data/x.tif"
    assert parse_time("2021-01-31", "x") == (2021, 31) and parse_time("2021-365", "x") == (2021, 365)


def test_expand_local(tmp_path):
    _touch(tmp_path, "a_img.tif", "b_img.tif")
    assert expand(str(tmp_path / "a_img.tif")) == [str(tmp_path / "a_img.tif")]
    assert expand(str(tmp_path / "missing")) == []
    assert len(expand(str(tmp_path), "_img.tif")) == 2


def test_split_forms():
    assert DataSource(tiles="/d").tile_paths == ("/d",)
    assert DataSource(scenes=["/a", "/b"]).scene_paths == ("/a", "/b") and DataSource(scenes="/a").tile_paths == ()
