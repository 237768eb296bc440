"""Decode + normalise throughput per core: our windowed rasterio reader vs a rioxarray whole-file path, with floors.

Same files, same run, one thread (``GDAL_NUM_THREADS=1``), page cache warm. Paths timed per tile (image + mask),
interleaved round by round so load from other jobs hits them alike:

* ``gdal``: the floor. Raw GDAL C API through ctypes (``GDALOpenEx`` + one ``GDALDatasetRasterIO`` of all bands
  in the file's dtype + ``GDALClose``): open, IFD parse, decompression, predictor, de-interleave; nothing else.
* ``rio``: ``rasterio.open`` + ``read(out=...)`` in the file's dtype, no normalisation (rasterio's own cost on top
  of the floor is mostly the CRS it parses on every open).
* ``ours``: ``TileReader.read`` (checks, band selection, nodata mask, per-band ``(x - mean) / std`` into the
  float32 batch slot, mask to int64 with -1 for nodata) under ``GDAL_OPTIONS``, opening local files through the
  GDAL C API fast path (``encdec.data.gdal_fast``, the default).
* ``ours-rio``: the same reader with ``ENCDEC_GDAL_FASTPATH=0`` (every file through ``rasterio.open``: the
  fallback, and what object-store URLs get).
* ``rioxarray``: what TerraTorch's generic pixel-wise datasets do per sample:
  ``rioxarray.open_rasterio(path, masked=True).fillna(...).to_numpy()`` for image and mask, channels-last float32,
  then ``(x - mean) / std``. Timed under our ``GDAL_OPTIONS`` (the headline ratio: it only helps rioxarray) and
  under GDAL's defaults (``rioxarray-default``, what a TerraTorch run gets).

Files (6-band int16 HLS-like + int8 mask, same pixels): ``cog`` = what ``encdec-launch make-data`` writes (COG,
256 blocks, pixel interleave, predictor 2, overviews at 512); ``tiled`` = a plain tiled GeoTIFF with one block per
tile (256 blocks for 224 tiles, 512 for 512), predictor 2, no overviews, as HLS/Sen1Floods11-style chips are
usually stored. ``bound`` = rioxarray / gdal: the best ratio any reader can reach on those files (it must at
least decode them); when it is below 5 the 5x goal is impossible for that file type.

Reported: ms per tile of process CPU time (robust on a shared machine), best of ``--repeat`` rounds. Needs
``pip install rioxarray`` (not a project dependency).

    nice .venv/bin/python benchmarks/data_throughput.py --sizes 224 512 --tiles 24 --repeat 7 \\
        --compress none zstd deflate lzw --layouts cog tiled --gdal-threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from encdec.config import HLS_BANDS, HLS_MEANS, HLS_STDS
from encdec.data.gdal_fast import ENV_SWITCH
from encdec.data.normalize import Normalizer
from encdec.data.readers import GDAL_OPTIONS, TileReader
from encdec.data.sources import Sample
from encdec.data.synthetic import write_tiles

GDT = {"int16": 3, "int8": 14, "uint8": 1, "uint16": 2}  # GDALDataType codes (GDAL >= 3.7 for Int8)


def load_libgdal() -> Any | None:
    """The libgdal rasterio is linked to (wheel layout ``rasterio.libs``), or ``None`` when not found."""
    import rasterio

    found = glob.glob(os.path.join(os.path.dirname(rasterio.__file__) + ".libs", "libgdal*.so*"))
    if not found:
        return None
    lib = ctypes.CDLL(found[0])
    lib.GDALAllRegister()
    lib.GDALOpenEx.restype = ctypes.c_void_p
    lib.GDALOpenEx.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.GDALDatasetRasterIO.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_void_p] + \
        [ctypes.c_int] * 4 + [ctypes.c_void_p] + [ctypes.c_int] * 3
    lib.GDALClose.argtypes = [ctypes.c_void_p]
    return lib


def gdal_path(lib: Any) -> Callable[[list[Sample], int], None]:
    def run(samples: list[Sample], size: int) -> None:
        image, mask = np.empty((6, size, size), np.int16), np.empty((size, size), np.int8)
        all_bands, one = (ctypes.c_int * 6)(1, 2, 3, 4, 5, 6), (ctypes.c_int * 1)(1)
        for s in samples:
            for path, buf, n, bands in ((s.images[0], image, 6, all_bands), (s.mask, mask, 1, one)):
                h = lib.GDALOpenEx(path.encode(), 0x02, None, None, None)  # GDAL_OF_RASTER, read-only
                if not h or lib.GDALDatasetRasterIO(h, 0, 0, 0, size, size, buf.ctypes.data, size, size,
                                                    GDT[buf.dtype.name], n, bands, 0, 0, 0):
                    raise RuntimeError(f"GDAL could not read {path}")
                lib.GDALClose(h)
    return run


def rio_path(samples: list[Sample], size: int) -> None:
    import rasterio

    image, mask = np.empty((6, size, size), np.int16), np.empty((size, size), np.int8)
    for s in samples:
        with rasterio.open(s.images[0]) as ds:
            ds.read(out=image)
        with rasterio.open(s.mask) as ds:
            ds.read(1, out=mask)


def ours(samples: list[Sample], size: int) -> None:
    reader = TileReader(bands=HLS_BANDS, normalizer=Normalizer(HLS_MEANS, HLS_STDS), img_size=size, target="mask")
    image = np.empty((6, size, size), np.float32)
    mask = np.empty((size, size), np.int64)
    for s in samples:
        reader.read(s, image, mask)
    reader.close()


def ours_rio(samples: list[Sample], size: int) -> None:
    old = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "0"
    try:
        ours(samples, size)
    finally:
        if old is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = old


def rioxarray_path(samples: list[Sample], size: int) -> None:
    import rioxarray

    means = np.asarray(HLS_MEANS, np.float32)
    stds = np.asarray(HLS_STDS, np.float32)
    for s in samples:
        image = rioxarray.open_rasterio(s.images[0], masked=True).fillna(0).to_numpy()
        image = np.moveaxis(image, 0, -1).astype(np.float32)
        mask = rioxarray.open_rasterio(s.mask, masked=True).fillna(-1).to_numpy()[0]
        image = (image - means) / stds
        np.ascontiguousarray(np.moveaxis(image, -1, 0)), mask.astype(np.int64)


def write_set(root: Path, size: int, codec: str, layout: str, n: int) -> Path:
    """``n`` tile pairs of one size/codec/layout; ``tiled`` re-encodes the ``cog`` pixels losslessly."""
    if layout == "cog":
        return write_tiles(root / f"s{size}-{codec}-cog", n, img_size=size, seed=size, compress=codec)
    import rasterio

    src = write_tiles(root / f"s{size}-none-src", n, img_size=size, seed=size, compress="none")
    out = root / f"s{size}-{codec}-{layout}"
    out.mkdir(parents=True, exist_ok=True)
    block = 256 if size <= 256 else 512
    for f in sorted(src.glob("*.tif")):
        with rasterio.open(f) as ds:
            profile, data, desc = ds.profile.copy(), ds.read(), ds.descriptions
        profile.update(driver="GTiff", tiled=True, blockxsize=block, blockysize=block, compress=codec,
                       interleave="pixel")
        if codec != "none":
            profile.update(predictor=2)
        with rasterio.open(out / f.name, "w", **profile) as ds:
            ds.write(data)
            ds.descriptions = desc
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    p.add_argument("--tiles", type=int, default=24)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--compress", nargs="+", default=["none", "zstd", "deflate", "lzw"])
    p.add_argument("--layouts", nargs="+", default=["cog", "tiled"], choices=["cog", "tiled"])
    p.add_argument("--gdal-threads", type=int, default=0, help="also time ours with GDAL_NUM_THREADS=N (0: skip)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the tiles (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="append one JSON row per file set here")
    args = p.parse_args()
    import rasterio
    import rioxarray  # noqa: F401  (imported before timing: the first round must not pay the import)

    lib = load_libgdal()
    root = args.dir or Path(tempfile.mkdtemp(prefix="encdec-bench-"))
    ours_env = dict(GDAL_OPTIONS)
    # GDAL defaults except one decode thread (the per-core figure; GDAL's default is 1 as well).
    default_env = {"GDAL_NUM_THREADS": "1"}
    paths: dict[str, tuple[Callable[[list[Sample], int], None], dict[str, str]]] = {}
    if lib is not None:
        paths["gdal"] = (gdal_path(lib), ours_env)
    paths.update({"rio": (rio_path, ours_env), "ours": (ours, ours_env), "ours-rio": (ours_rio, ours_env),
                  "rioxarray": (rioxarray_path, ours_env),
                  "rioxarray-default": (rioxarray_path, default_env)})
    if args.gdal_threads:
        paths[f"ours-{args.gdal_threads}t"] = (ours, {**GDAL_OPTIONS, "GDAL_NUM_THREADS": str(args.gdal_threads)})
    rows = []
    for layout in args.layouts:
        for codec in args.compress:
            for size in args.sizes:
                folder = write_set(root, size, codec, layout, args.tiles)
                samples = [Sample(images=(str(folder / f"tile_{i:05d}_img.tif"),),
                                  mask=str(folder / f"tile_{i:05d}_mask.tif")) for i in range(args.tiles)]
                for f in folder.iterdir():  # warm the page cache
                    f.read_bytes()
                cpu = {k: float("inf") for k in paths}
                wall = dict(cpu)
                for _ in range(args.repeat):
                    for name, (fn, env) in paths.items():
                        with rasterio.Env(**env):
                            c0, w0 = time.process_time(), time.perf_counter()
                            fn(samples, size)
                            cpu[name] = min(cpu[name], time.process_time() - c0)
                            wall[name] = min(wall[name], time.perf_counter() - w0)
                row: dict[str, Any] = {"size": size, "codec": codec, "layout": layout, "tiles": args.tiles,
                                       "load": os.getloadavg()[0]}
                for name in paths:
                    row[f"{name}_ms"] = round(cpu[name] / args.tiles * 1e3, 2)
                    row[f"{name}_wall_ms"] = round(wall[name] / args.tiles * 1e3, 2)
                row["ratio"] = round(cpu["rioxarray"] / cpu["ours"], 2)
                row["ratio_rio"] = round(cpu["rioxarray"] / cpu["ours-rio"], 2)
                row["ratio_default"] = round(cpu["rioxarray-default"] / cpu["ours"], 2)
                if "gdal" in cpu:
                    row["bound"] = round(cpu["rioxarray"] / cpu["gdal"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print("\n| tile | codec, layout | load | gdal floor | rio read | ours (fast path) | ours (rasterio path) | "
          "rioxarray (ours env / default) | ratio fast (ours env / default) | ratio rasterio path | "
          "bound = rioxarray / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| 6x{r['size']} | {r['codec']}, {r['layout']} | {r['load']:.1f} | {r.get('gdal_ms', '-')} | "
              f"{r['rio_ms']} | {r['ours_ms']} | {r['ours-rio_ms']} | {r['rioxarray_ms']} / "
              f"{r['rioxarray-default_ms']} | {r['ratio']}x / {r['ratio_default']}x | {r['ratio_rio']}x | "
              f"{r.get('bound', '-')}x |")


if __name__ == "__main__":
    main()
