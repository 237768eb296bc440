"""Readers on real GeoTIFFs written here: band selection, nodata, dtypes, windows, multi-temporal, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from _rasters import GEO, pixels, write_bad_tiles

from encdec.data import augment as aug
from encdec.data.badtiles import BadTileError
from encdec.data.normalize import Normalizer
from encdec.data.readers import TileReader, mark_nodata, resolve_bands, typed_nodata
from encdec.data.sources import Sample
from encdec.data.synthetic import HLS_BANDS, write_raster

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def _reader(bands, means=None, stds=None, size=32, **kw) -> TileReader:
    n = len(bands)
    return TileReader(bands=bands, normalizer=Normalizer(means or [0.0] * n, stds or [1.0] * n), img_size=size, **kw)


def test_band_selection_by_name_and_index(tmp_path):
    px = pixels()
    write_raster(tmp_path / "a.tif", px, nodata=-9999, descriptions=HLS_BANDS, **GEO)
    sample = Sample(images=(str(tmp_path / "a.tif"),))
    out = np.empty((3, 32, 32), np.float32)
    _reader(["nir_narrow", "RED", 0], target="none").read(sample, out, None)
    np.testing.assert_array_equal(out, px[[3, 2, 0]].astype(np.float32))


def test_missing_band_name_and_index_are_bad_tiles(tmp_path):
    write_raster(tmp_path / "a.tif", pixels(c=4), descriptions=("BLUE", "GREEN", "RED", "NIR_NARROW"))
    sample = Sample(images=(str(tmp_path / "a.tif"),))
    out = np.empty((1, 32, 32), np.float32)
    with pytest.raises(BadTileError) as e:
        _reader(["SWIR_1"], target="none").read(sample, out, None)
    assert e.value.reason == "band-name" and "NIR_NARROW" in str(e.value)
    with pytest.raises(BadTileError) as e:
        _reader([5], target="none").read(sample, out, None)
    assert e.value.reason == "band-count"
    assert resolve_bands(["green", 3], ("BLUE", "GREEN", None, "X"), 4, "f") == (2, 4)


def test_normalisation_values_and_nodata(tmp_path):
    px = pixels(c=2)
    px[:, :4, :] = -9999
    write_raster(tmp_path / "img.tif", px, nodata=-9999, descriptions=("A", "B"), **GEO)
    mask = np.ones((1, 32, 32), np.int16)
    mask[0, 10, 10] = 255  # the mask's own nodata value also becomes -1
    write_raster(tmp_path / "mask.tif", mask, nodata=255, **GEO)
    sample = Sample(images=(str(tmp_path / "img.tif"),), mask=str(tmp_path / "mask.tif"))
    out = np.empty((2, 32, 32), np.float32)
    tgt = np.empty((32, 32), np.int64)
    r = _reader(["A", "B"], means=[1000.0, 2000.0], stds=[500.0, 250.0], target="mask").read(sample, out, tgt)
    expected = (px[:, 4:].astype(np.float64) - np.array([1000, 2000])[:, None, None]) / np.array([500, 250])[:, None, None]
    np.testing.assert_allclose(out[:, 4:], expected, rtol=1e-5)
    assert (out[:, :4] == 0).all()
    assert (tgt[:4] == -1).all() and tgt[10, 10] == -1 and (tgt[4:10] == 1).all()
    assert r.valid_fraction == pytest.approx(28 / 32)


@pytest.mark.parametrize("dtype", ["uint16", "float32", "uint8"])
def test_dtypes_convert_to_float32(tmp_path, dtype):
    px = pixels(c=2, dtype=dtype)
    write_raster(tmp_path / "a.tif", px, descriptions=("A", "B"))
    out = np.empty((2, 32, 32), np.float32)
    _reader([0, 1], target="none").read(Sample(images=(str(tmp_path / "a.tif"),)), out, None)
    np.testing.assert_array_equal(out, px.astype(np.float32))


def test_float_mask_gives_regression_target_with_nan(tmp_path):
    px = pixels(c=1)
    px[0, 0, 0] = -9999
    write_raster(tmp_path / "img.tif", px, nodata=-9999)
    write_raster(tmp_path / "m.tif", np.full((1, 32, 32), 0.25, np.float32))
    sample = Sample(images=(str(tmp_path / "img.tif"),), mask=str(tmp_path / "m.tif"))
    reader = _reader([0], target="none")
    assert reader.probe_target(sample) == "regression"
    reader.target = "regression"
    tgt = np.empty((32, 32), np.float32)
    reader.read(sample, np.empty((1, 32, 32), np.float32), tgt)
    assert np.isnan(tgt[0, 0]) and (tgt.ravel()[1:] == 0.25).all()


def test_crop_windows_read_only_the_window(tmp_path):
    px = pixels(c=1, s=48)
    write_raster(tmp_path / "a.tif", px)
    sample = Sample(images=(str(tmp_path / "a.tif"),))
    out = np.empty((1, 32, 32), np.float32)
    reader = _reader([0], target="none")
    reader.read(sample, out, None)  # centre crop
    off = aug.crop_offset(48, 32, 0.5)
    np.testing.assert_array_equal(out[0], px[0, off:off + 32, off:off + 32])
    reader.read(sample, out, None, aug.AugmentParams(crop=(0.0, 0.999)))
    np.testing.assert_array_equal(out[0], px[0, :32, 16:])
    chip = Sample(images=sample.images, window=(40, -8, 32, 32))  # past the bottom and left edge: padded
    reader.read(chip, out, None)
    np.testing.assert_array_equal(out[0, :8, 8:], px[0, 40:, :24])
    assert (out[0, 8:] == 0).all() and (out[0, :, :8] == 0).all()


def test_flips_and_rot90_apply_to_image_and_mask_alike(tmp_path):
    px = pixels(c=1)
    write_raster(tmp_path / "i.tif", px)
    write_raster(tmp_path / "m.tif", (px % 7).astype(np.int16))
    sample = Sample(images=(str(tmp_path / "i.tif"),), mask=str(tmp_path / "m.tif"))
    reader = _reader([0], target="mask")
    out, tgt = np.empty((1, 32, 32), np.float32), np.empty((32, 32), np.int64)
    reader.read(sample, out, tgt, aug.AugmentParams(hflip=True, vflip=False, rot90=1))
    expected = np.rot90(px[0, :, ::-1], 1)
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(tgt, expected % 7)


def test_multitemporal_band_groups_and_files(tmp_path):
    frames = [pixels(c=3, seed=t) for t in range(2)]
    write_raster(tmp_path / "stack.tif", np.concatenate(frames), descriptions=("B", "G", "R") * 2)
    for t in range(2):
        write_raster(tmp_path / f"t{t}.tif", frames[t], descriptions=("B", "G", "R"))
    expected = np.stack([f[[2, 0]] for f in frames], axis=1).astype(np.float32)  # [C, T, H, W]
    reader = _reader(["R", "B"], num_frames=2, target="none")
    for sample in (Sample(images=(str(tmp_path / "stack.tif"),)),
                   Sample(images=(str(tmp_path / "t0.tif"), str(tmp_path / "t1.tif")))):
        out = np.empty((2, 2, 32, 32), np.float32)
        reader.read(sample, out, None)
        np.testing.assert_array_equal(out, expected)
    with pytest.raises(BadTileError) as e:
        _reader(["R"], num_frames=3, target="none").read(Sample(images=(str(tmp_path / "t0.tif"),) * 2),
                                                       np.empty((1, 3, 32, 32), np.float32), None)
    assert e.value.reason == "frames"


def test_location_from_crs_centre(tmp_path):
    write_raster(tmp_path / "a.tif", pixels(c=1), **GEO)
    r = _reader([0], target="none", location_coords=True).read(Sample(images=(str(tmp_path / "a.tif"),)),
                                                               np.empty((1, 32, 32), np.float32), None)
    lat, lon = r.location
    assert 36.0 < lat < 36.2 and -93.1 < lon < -92.9  # UTM 15N, 500 km easting = the -93 meridian


def test_bad_tiles_raise_with_reason(tmp_path):
    write_bad_tiles(tmp_path)
    cases = {
        "unreadable": Sample(images=(str(tmp_path / "junk.tif"),)),
        "size": Sample(images=(str(tmp_path / "small.tif"),)),
        "all-nodata": Sample(images=(str(tmp_path / "empty.tif"),)),
        "mask-mismatch": Sample(images=(str(tmp_path / "ok.tif"),), mask=str(tmp_path / "m40.tif")),
    }
    reader = _reader([0], target="mask")
    for reason, sample in cases.items():
        with pytest.raises(BadTileError) as e:
            reader.read(sample, np.empty((1, 32, 32), np.float32), np.empty((32, 32), np.int64))
        assert e.value.reason == reason, (reason, str(e.value))
        assert e.value.path in str(e.value)


@pytest.mark.parametrize("nodata", [-9999, np.nan])
def test_mark_nodata_matches_any_over_bands(nodata):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 100, (4, 16, 16)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = nodata
    invalid = np.zeros((16, 16), bool)
    invalid[0, 0] = True  # already-invalid pixels stay invalid
    expected = invalid | (np.isnan(x) if np.isnan(nodata) else x == nodata).any(axis=0)
    mark_nodata(x, typed_nodata(x.dtype, nodata), invalid, np.empty((16, 16), bool))
    np.testing.assert_array_equal(invalid, expected)


def test_normaliser_per_band_values_frames_and_invalid():
    rng = np.random.default_rng(2)
    raw = rng.integers(-500, 6000, (3, 2, 8, 8)).astype(np.int16)  # [C, T, H, W]
    invalid = rng.random((8, 8)) < 0.2
    means, stds = [100.0, 2000.0, -3.5], [10.0, 700.0, 0.25]
    out = Normalizer(means, stds)(raw, np.empty(raw.shape, np.float32), invalid)
    expected = (raw - np.float32(means)[:, None, None, None]) * (1 / np.float32(stds))[:, None, None, None]
    expected[:, :, invalid] = 0
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_whole_tiles_close_their_files_chips_keep_the_scene_open(tmp_path):
    write_raster(tmp_path / "a.tif", pixels(c=1, s=64), **GEO)
    reader = _reader([0], target="none")
    out = np.empty((1, 32, 32), np.float32)
    reader.read(Sample(images=(str(tmp_path / "a.tif"),), window=(0, 0, 32, 32)), out, None)
    assert str(tmp_path / "a.tif") in reader.files.local.cache
    reader.read(Sample(images=(str(tmp_path / "a.tif"),)), out, None)
    assert not reader.files.local.cache
