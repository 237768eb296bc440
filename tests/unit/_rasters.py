"""GeoTIFF test data shared by the reader tests (rasterio path and GDAL fast path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from affine import Affine

from encdec.data.synthetic import write_raster

GEO = {"crs": "EPSG:32615", "transform": Affine(30, 0, 500000, 0, -30, 4000000)}


def pixels(c: int = 6, s: int = 32, dtype: str = "int16", seed: int = 0) -> np.ndarray:
    """Seeded reflectance-like values ``[c, s, s]`` (uint8: folded into its range)."""
    px = np.random.default_rng(seed).integers(100, 5000, (c, s, s))
    return (px % 250 if dtype == "uint8" else px).astype(dtype)


def write_bad_tiles(root: Path) -> None:
    """One file per basic bad-tile kind: junk bytes, a 16 px tile, an all-nodata tile, a good georeferenced tile
    (``ok.tif``) and a 40 px mask that does not fit it."""
    (root / "junk.tif").write_bytes(b"not a tiff")
    write_raster(root / "small.tif", pixels(c=1, s=16))
    write_raster(root / "empty.tif", np.full((1, 32, 32), -9999, np.int16), nodata=-9999)
    write_raster(root / "ok.tif", pixels(c=1), **GEO)
    write_raster(root / "m40.tif", np.zeros((1, 40, 40), np.int16))
