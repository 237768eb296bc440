"""The GDAL C API fast path gives byte-identical reads and the same bad tiles as the rasterio path."""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
import pytest
from _rasters import GEO, pixels, write_bad_tiles
from affine import Affine

from encdec.data import augment as aug
from encdec.data.badtiles import BadTileError
from encdec.data.gdal_fast import ENV_SWITCH, GdalDataset, handles, libgdal
from encdec.data.normalize import Normalizer
from encdec.data.readers import TileReader
from encdec.data.sources import Sample
from encdec.data.synthetic import HLS_BANDS, write_raster

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def _reader(bands, size=32, **kw) -> TileReader:
    n = len(bands)
    means, stds = [float(100 * i + 7) for i in range(n)], [float(13 + i) for i in range(n)]
    return TileReader(bands=bands, normalizer=Normalizer(means, stds), img_size=size, **kw)


def _both(monkeypatch, make_reader, samples, shape, target_dtype=None, params=aug.NO_AUGMENT):
    """Read every sample through the fast path and through rasterio; return both lists of outputs."""
    results = {}
    opened: list[GdalDataset] = []
    real_open = GdalDataset.open.__func__

    def counting_open(cls, path):  # the real open, recording the handles it gives (proves the path was taken)
        ds = real_open(cls, path)
        if ds is not None:
            opened.append(ds)
        return ds

    monkeypatch.setattr(GdalDataset, "open", classmethod(counting_open))
    for switch in ("1", "0"):
        monkeypatch.setenv(ENV_SWITCH, switch)
        before = len(opened)
        reader = make_reader()
        outs = []
        for sample in samples:
            img = np.full(shape, 7.5, np.float32)
            tgt = None if target_dtype is None else np.full(shape[-2:], 3, target_dtype)
            res = reader.read(sample, img, tgt, params)
            outs.append((img, tgt, res.valid_fraction, res.location))
        reader.close()
        assert (len(opened) > before) is (switch == "1")
        results[switch] = outs
    monkeypatch.undo()
    return results["1"], results["0"]


def _assert_identical(fast, slow):
    assert len(fast) == len(slow)
    for (fi, ft, fv, fl), (si, st, sv, sl) in zip(fast, slow, strict=True):
        assert fi.tobytes() == si.tobytes()
        assert (ft is None and st is None) or ft.tobytes() == st.tobytes()
        assert fv == sv and fl == sl


def test_fast_path_is_used_for_local_files_and_switch_turns_it_off(tmp_path, monkeypatch):
    write_raster(tmp_path / "a.tif", pixels(c=1, s=64), **GEO)
    chip = Sample(images=(str(tmp_path / "a.tif"),), window=(0, 0, 32, 32))  # chips keep the scene open
    for switch, fast in (("1", True), ("0", False), ("off", False)):
        monkeypatch.setenv(ENV_SWITCH, switch)
        reader = _reader([0], target="none")
        reader.read(chip, np.empty((1, 32, 32), np.float32), None)
        assert isinstance(reader.files.local.cache[chip.images[0]], GdalDataset) is fast, switch
        reader.close()
    assert handles("/data/a.tif") and handles("rel/a.tif")
    assert not handles("s3://bucket/a.tif") and not handles("gs://b/a.tif") and not handles("/vsicurl/http://x")


def test_binds_the_libgdal_rasterio_loaded_not_a_second_copy():
    import rasterio  # noqa: F401

    assert libgdal() is not None
    with open("/proc/self/maps") as f:
        paths = {line.rsplit(" ", 1)[-1].strip() for line in f}
    assert len({os.path.realpath(p) for p in paths if os.path.basename(p).startswith("libgdal")}) == 1


def test_unsupported_dtype_falls_back_to_rasterio(tmp_path, monkeypatch):
    write_raster(tmp_path / "a.tif", pixels(c=1, s=64, dtype="int64"))
    monkeypatch.setenv(ENV_SWITCH, "1")
    assert GdalDataset.open(str(tmp_path / "a.tif")) is None
    reader = _reader([0], target="none")
    chip = Sample(images=(str(tmp_path / "a.tif"),), window=(0, 0, 32, 32))
    out = np.empty((1, 32, 32), np.float32)
    reader.read(chip, out, None)
    assert not isinstance(reader.files.local.cache[chip.images[0]], GdalDataset)
    expected = (pixels(c=1, s=64, dtype="int64")[0, :32, :32] - np.float32(7)) * (1 / np.float32(13))
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["int16", "uint16", "float32", "uint8"])
@pytest.mark.parametrize("nodata", [None, 0, 200])
def test_tiles_with_bands_by_name_and_index_nodata_and_mask(tmp_path, monkeypatch, dtype, nodata):
    px = pixels(dtype=dtype)
    if nodata is not None:
        px[:, :3] = nodata
        px[2, 10, 10:20] = nodata
    write_raster(tmp_path / "img.tif", px, nodata=nodata, descriptions=HLS_BANDS, **GEO)
    mask = (px[0] % 3).astype(np.uint8)[None]
    mask[0, 20, 20] = 255
    write_raster(tmp_path / "mask.tif", mask, nodata=255, **GEO)
    sample = Sample(images=(str(tmp_path / "img.tif"),), mask=str(tmp_path / "mask.tif"))
    for bands in (["nir_narrow", "RED", 0], [5, 1], list(HLS_BANDS)):
        fast, slow = _both(monkeypatch, lambda b=bands: _reader(b, target="mask"), [sample],
                           (len(bands), 32, 32), np.int64, aug.AugmentParams(hflip=True, rot90=3))
        _assert_identical(fast, slow)


def test_crops_of_larger_tiles_and_regression_masks(tmp_path, monkeypatch):
    px = pixels(c=3, s=48, dtype="float32")
    px[0, 5, 5] = np.nan
    write_raster(tmp_path / "img.tif", px, nodata=np.nan, descriptions=("A", "B", "C"), **GEO)
    write_raster(tmp_path / "m.tif", (px[:1] / 7).astype(np.float32), **GEO)
    sample = Sample(images=(str(tmp_path / "img.tif"),), mask=str(tmp_path / "m.tif"))
    for crop in ((0.0, 0.0), (0.999, 0.3), (0.5, 0.5)):
        fast, slow = _both(monkeypatch, lambda: _reader(["C", "A"], target="regression", location_coords=True),
                           [sample], (2, 32, 32), np.float32, aug.AugmentParams(crop=crop))
        _assert_identical(fast, slow)
        assert fast[0][3] is not None  # the location came from the fast path's WKT -> CRS


@pytest.mark.parametrize("nodata", [None, -9999])
def test_chips_of_a_scene_with_padded_edges(tmp_path, monkeypatch, nodata):
    px = pixels(c=4, s=90)
    px[:, 60:, :20] = -9999
    write_raster(tmp_path / "scene.tif", px, nodata=nodata, descriptions=("B", "G", "R", "N"), **GEO)
    write_raster(tmp_path / "smask.tif", (px[:1] % 2).astype(np.int16), **GEO)
    chips = [(r, c, 32, 32) for r in range(-8, 90, 25) for c in range(-8, 90, 25)]
    samples = [Sample(images=(str(tmp_path / "scene.tif"),), mask=str(tmp_path / "smask.tif"), window=w)
               for w in chips]
    readable = []
    monkeypatch.setenv(ENV_SWITCH, "0")
    for s in samples:  # windows entirely nodata are bad tiles (tested below); compare the rest
        try:
            _reader(["N", "B"], target="mask").read(s, np.empty((2, 32, 32), np.float32),
                                                    np.empty((32, 32), np.int64))
            readable.append(s)
        except BadTileError:
            pass
    assert len(readable) > 10
    fast, slow = _both(monkeypatch, lambda: _reader(["N", "B"], target="mask"), readable, (2, 32, 32), np.int64)
    _assert_identical(fast, slow)


def test_multitemporal_band_groups_and_files(tmp_path, monkeypatch):
    frames = [pixels(c=3, seed=t, dtype="uint16") for t in range(2)]
    write_raster(tmp_path / "stack.tif", np.concatenate(frames), nodata=0, descriptions=("B", "G", "R") * 2, **GEO)
    for t in range(2):
        write_raster(tmp_path / f"t{t}.tif", frames[t], nodata=0, descriptions=("B", "G", "R"), **GEO)
    samples = [Sample(images=(str(tmp_path / "stack.tif"),)),
               Sample(images=(str(tmp_path / "t0.tif"), str(tmp_path / "t1.tif")))]
    fast, slow = _both(monkeypatch, lambda: _reader(["R", "B"], num_frames=2, target="none"), samples,
                       (2, 2, 32, 32))
    _assert_identical(fast, slow)
    assert fast[0][0].tobytes() == fast[1][0].tobytes()


def _bad_cases(tmp_path):
    write_bad_tiles(tmp_path)
    write_raster(tmp_path / "m2.tif", np.zeros((2, 32, 32), np.int16), **GEO)
    write_raster(tmp_path / "mshift.tif", np.zeros((1, 32, 32), np.int16), crs=GEO["crs"],
                 transform=Affine(30, 0, 500030, 0, -30, 4000000))
    write_raster(tmp_path / "mcrs.tif", np.zeros((1, 32, 32), np.int16), crs="EPSG:32616",
                 transform=GEO["transform"])
    write_raster(tmp_path / "big.tif", pixels(c=1, s=256, seed=3), **GEO)
    data = (tmp_path / "big.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[:len(data) // 2] + b"\0" * 64)  # header intact, blocks cut
    write_raster(tmp_path / "two.tif", pixels(c=2))
    one = str(tmp_path / "ok.tif")
    return {
        "missing": ("unreadable", Sample(images=(str(tmp_path / "nope.tif"),))),
        "junk": ("unreadable", Sample(images=(str(tmp_path / "junk.tif"),))),
        "junk-mask": ("unreadable", Sample(images=(one,), mask=str(tmp_path / "junk.tif"))),
        "truncated": ("unreadable", Sample(images=(str(tmp_path / "trunc.tif"),), window=(200, 200, 32, 32))),
        "size": ("size", Sample(images=(str(tmp_path / "small.tif"),))),
        "frame-size": ("size", Sample(images=(one, str(tmp_path / "small.tif")))),
        "all-nodata": ("all-nodata", Sample(images=(str(tmp_path / "empty.tif"),))),
        "mask-size": ("mask-mismatch", Sample(images=(one,), mask=str(tmp_path / "m40.tif"))),
        "mask-bands": ("mask-mismatch", Sample(images=(one,), mask=str(tmp_path / "m2.tif"))),
        "mask-shift": ("mask-mismatch", Sample(images=(one,), mask=str(tmp_path / "mshift.tif"))),
        "mask-crs": ("mask-mismatch", Sample(images=(one,), mask=str(tmp_path / "mcrs.tif"))),
        "band-count": ("band-count", Sample(images=(str(tmp_path / "two.tif"),))),
    }


def test_each_bad_tile_kind_has_the_same_reason_and_message(tmp_path, monkeypatch):
    cases = _bad_cases(tmp_path)
    errors: dict[str, dict[str, BadTileError]] = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(ENV_SWITCH, switch)
        for name, (_, sample) in cases.items():
            frames = len(sample.images)
            reader = _reader([0] if name != "band-count" else [3], target="mask", num_frames=frames)
            shape = (1, frames, 32, 32) if frames > 1 else (1, 32, 32)
            with pytest.raises(BadTileError) as e:
                reader.read(sample, np.empty(shape, np.float32), np.empty((32, 32), np.int64))
            errors.setdefault(name, {})[switch] = e.value
    for name, (reason, _) in cases.items():
        fast, slow = errors[name]["1"], errors[name]["0"]
        assert fast.reason == slow.reason == reason, (name, str(fast), str(slow))
        assert fast.path == slow.path and fast.path in str(fast)
        if reason != "unreadable":  # our own messages; unreadable ones quote GDAL (same text, other type name)
            assert str(fast) == str(slow), name


def test_equivalent_crs_written_differently_is_not_a_mismatch(tmp_path, monkeypatch):
    write_raster(tmp_path / "img.tif", pixels(c=1), **GEO)
    write_raster(tmp_path / "m.tif", np.ones((1, 32, 32), np.int16), transform=GEO["transform"],
                 crs="+proj=utm +zone=15 +datum=WGS84 +units=m +no_defs")
    sample = Sample(images=(str(tmp_path / "img.tif"),), mask=str(tmp_path / "m.tif"))
    outcome = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(ENV_SWITCH, switch)
        try:
            _reader([0], target="mask").read(sample, np.empty((1, 32, 32), np.float32), np.empty((32, 32), np.int64))
            outcome[switch] = "ok"
        except BadTileError as e:
            outcome[switch] = e.reason
    assert outcome["1"] == outcome["0"]


def test_threads_share_one_reader(tmp_path, monkeypatch):
    samples = []
    for i in range(12):
        write_raster(tmp_path / f"i{i}.tif", pixels(c=3, seed=i), descriptions=("A", "B", "C"), **GEO)
        write_raster(tmp_path / f"m{i}.tif", (pixels(c=1, seed=i) % 4).astype(np.uint8), **GEO)
        samples.append(Sample(images=(str(tmp_path / f"i{i}.tif"),), mask=str(tmp_path / f"m{i}.tif")))
    fast, slow = _both(monkeypatch, lambda: _reader(["C", "A"], target="mask"), samples, (2, 32, 32), np.int64)
    _assert_identical(fast, slow)
    monkeypatch.setenv(ENV_SWITCH, "1")
    reader = _reader(["C", "A"], target="mask")
    got: dict[int, bytes] = {}
    wrong: list[int] = []

    def work(offset: int) -> None:
        for _ in range(5):
            for k in range(offset, len(samples), 4):
                img, tgt = np.empty((2, 32, 32), np.float32), np.empty((32, 32), np.int64)
                reader.read(samples[k], img, tgt)
                if got.setdefault(k, img.tobytes() + tgt.tobytes()) != img.tobytes() + tgt.tobytes():
                    wrong.append(k)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    assert got == {k: f[0].tobytes() + f[1].tobytes() for k, f in enumerate(fast)}


def _write_gtiff(path, array, crs, transform, **creation) -> None:
    import rasterio

    c, h, w = array.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=array.dtype.name, crs=crs,
                       transform=transform, **creation) as ds:
        ds.write(array)


@pytest.mark.parametrize("creation", [{}, {"BIGTIFF": "YES"}, {"ENDIANNESS": "BIG"},
                                      {"BIGTIFF": "YES", "ENDIANNESS": "BIG", "TILED": "YES", "COMPRESS": "ZSTD"}])
def test_geokeys_decide_mask_pairing_like_crs_objects_in_every_tiff_flavour(tmp_path, monkeypatch, creation):
    img = tmp_path / "img.tif"
    _write_gtiff(img, pixels(c=2), GEO["crs"], GEO["transform"], **creation)
    masks = {"same": (GEO["crs"], GEO["transform"]), "other-crs": ("EPSG:32616", GEO["transform"]),
             "shifted": (GEO["crs"], Affine(30, 0, 500030, 0, -30, 4000000)),
             "no-crs": (None, GEO["transform"])}
    for name, (crs, transform) in masks.items():
        _write_gtiff(tmp_path / f"{name}.tif", np.ones((1, 32, 32), np.uint8), crs, transform, **creation)
    monkeypatch.setenv(ENV_SWITCH, "1")
    a, b = GdalDataset.open(str(img)), GdalDataset.open(str(tmp_path / "same.tif"))
    other = GdalDataset.open(str(tmp_path / "other-crs.tif"))
    assert a.geokeys() and a.geokeys() == b.geokeys() != other.geokeys()
    assert GdalDataset.open(str(tmp_path / "no-crs.tif")).geokeys() == b""
    b.close()
    assert b.wkt == a.wkt  # looked up after close: reopened for the look-up
    outcome = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(ENV_SWITCH, switch)
        for name in masks:
            sample = Sample(images=(str(img),), mask=str(tmp_path / f"{name}.tif"))
            out, tgt = np.empty((2, 32, 32), np.float32), np.empty((32, 32), np.int64)
            try:
                _reader([1, 0], target="mask").read(sample, out, tgt)
                outcome[switch, name] = out.tobytes() + tgt.tobytes()
            except BadTileError as e:
                outcome[switch, name] = e.reason
    for name in masks:
        assert outcome["1", name] == outcome["0", name], name
    assert outcome["1", "other-crs"] == outcome["1", "shifted"] == "mask-mismatch"
    assert isinstance(outcome["1", "same"], bytes) and isinstance(outcome["1", "no-crs"], bytes)


def test_tiff_geokeys_on_non_tiff_and_truncated_files(tmp_path):
    from encdec.data.gdal_fast import tiff_geokeys

    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    assert tiff_geokeys(str(tmp_path / "x.png")) is None
    (tmp_path / "t.tif").write_bytes(b"II*\0" + (10 ** 6).to_bytes(4, "little"))
    with pytest.raises(struct.error):  # the IFD offset points past the end of the file
        tiff_geokeys(str(tmp_path / "t.tif"))


def test_uint8_tiles_read_without_a_gdal_warning(tmp_path):
    """GDAL >= 3.7 warns once per band when asked for the old PIXELTYPE=SIGNEDBYTE marker (92 lines in one run)."""
    import subprocess
    import sys

    write_raster(tmp_path / "u8.tif", pixels(c=3, dtype="uint8"), **GEO)
    probe = ("from encdec.data.gdal_fast import GdalDataset; "
             f"ds = GdalDataset.open({str(tmp_path / 'u8.tif')!r}); assert ds.dtypes == ('uint8',) * 3, ds.dtypes")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert "PIXELTYPE" not in out.stderr and "Warning" not in out.stderr, out.stderr
