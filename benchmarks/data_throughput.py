"""Decode + normalise throughput per core: our windowed rasterio reader vs a rioxarray whole-file path.

Same files, same run, one thread. The rioxarray path is what TerraTorch's generic pixel-wise datasets do per
sample: ``rioxarray.open_rasterio(path, masked=True).fillna(...).to_numpy()`` for image and mask, channels-last
float32, then per-band ``(x - mean) / std``. Ours: ``TileReader.read`` (open, read into the dtype, normalise
into the batch slot, nodata to 0/-1). Files are 6-band int16 HLS-like COGs written by ``encdec.data.synthetic``
with each codec in ``--compress`` (both paths read the same files); the page cache is warmed first so both paths
decode from memory. The codec's decode time is a floor both paths share, so the ratio is largest on light codecs.

Reported: tiles/s per CPU-second (process time, robust on a shared machine) and per wall-second, best of
``--repeat`` rounds, and the ratio ours / rioxarray. Needs ``pip install rioxarray`` (not a project dependency).

    .venv/bin/python benchmarks/data_throughput.py --sizes 224 512 --tiles 32 --repeat 5 --compress deflate zstd none
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from encdec.data.config import HLS_BANDS, HLS_MEANS, HLS_STDS
from encdec.data.normalize import Normalizer
from encdec.data.readers import GDAL_OPTIONS, TileReader
from encdec.data.sources import Sample
from encdec.data.synthetic import write_tiles


def ours(samples: list[Sample], size: int) -> None:
    reader = TileReader(bands=HLS_BANDS, normalizer=Normalizer(HLS_MEANS, HLS_STDS), img_size=size, target="mask")
    image = np.empty((6, size, size), np.float32)
    mask = np.empty((size, size), np.int64)
    for s in samples:
        reader.read(s, image, mask)
    reader.close()


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


def timed(fn, samples: list[Sample], size: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn(samples, size)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    p.add_argument("--tiles", type=int, default=48)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compress", nargs="+", default=["deflate", "zstd"], help="codecs to compare (same for both)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the tiles (default: a temp folder)")
    args = p.parse_args()
    import os

    for k, v in GDAL_OPTIONS.items():
        os.environ.setdefault(k, v)
    root = args.dir or Path(tempfile.mkdtemp(prefix="encdec-bench-"))
    results = []
    for size, codec in [(s, c) for c in args.compress for s in args.sizes]:
        folder = write_tiles(root / f"s{size}-{codec}", args.tiles, img_size=size, seed=size, compress=codec)
        samples = [Sample(images=(str(folder / f"tile_{i:05d}_img.tif"),), mask=str(folder / f"tile_{i:05d}_mask.tif"))
                   for i in range(args.tiles)]
        for f in folder.iterdir():  # warm the page cache
            f.read_bytes()
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeat):
            for name, fn in (("ours", ours), ("rioxarray", rioxarray_path)):
                cpu, wall = timed(fn, samples, size)
                prev = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(prev[0], cpu), min(prev[1], wall))
        row: dict[str, object] = {"size": size, "codec": codec, "tiles": args.tiles}
        for name, (cpu, wall) in best.items():
            row[f"{name}_tiles_per_cpu_s"] = round(args.tiles / cpu, 1)
            row[f"{name}_tiles_per_wall_s"] = round(args.tiles / wall, 1)
        row["ratio_cpu"] = round(best["rioxarray"][0] / best["ours"][0], 2)
        row["ratio_wall"] = round(best["rioxarray"][1] / best["ours"][1], 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    print("\n| tile | codec | ours tiles/s/core | rioxarray tiles/s/core | ratio (CPU) | ratio (wall) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| 6x{r['size']}x{r['size']} | {r['codec']} | {r['ours_tiles_per_cpu_s']} | "
              f"{r['rioxarray_tiles_per_cpu_s']} | {r['ratio_cpu']}x | {r['ratio_wall']}x |")


if __name__ == "__main__":
    main()
