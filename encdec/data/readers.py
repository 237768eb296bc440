"""Windowed rasterio reads of one sample into its batch slot: band selection, nodata, normalisation, augmentation.

Each call opens the sample's file(s), checks them (band count, size, mask pairing, nodata), reads only the window
it needs straight in the file's dtype and normalises into the caller's float32 slot in one pass. Everything that
can be wrong with a file raises ``BadTileError`` (skipped and counted by the feed); a setting that cannot work
raises ``DataConfigError``. rasterio is imported lazily so ``import encdec.data`` stays light.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from encdec.data import augment as aug
from encdec.data.badtiles import BadTileError, EmptyTileError
from encdec.data.gdal_fast import GdalDataset
from encdec.data.normalize import Normalizer
from encdec.data.sources import Sample

# GDAL options for many small files, measured in benchmarks/README.md (data section):
# - never list the folder on open: GDAL looks for sidecars (.aux.xml, .ovr, .msk, world files) by default, a
#   directory scan per open on a folder of thousands of tiles or an object-store prefix;
# - one decode thread per reader thread (the feed parallelises across tiles, not within one);
# - no VSI read-ahead cache: every byte of a tile is read once.
GDAL_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_NUM_THREADS": "1", "VSI_CACHE": "FALSE"}

TARGETS = ("mask", "regression", "label", "none")


def typed_nodata(dtype: np.dtype, nodata: float | None) -> Any:
    """The nodata value in ``dtype``, or ``None`` when unset or not representable (then it cannot occur)."""
    if nodata is None:
        return None
    if np.isnan(nodata):
        return None if dtype.kind != "f" else dtype.type(np.nan)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not info.min <= nodata <= info.max or nodata != int(nodata):
            return None
    return dtype.type(nodata)


def is_nodata(x: np.ndarray, nodata: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Boolean array: where ``x`` holds ``nodata`` (NaN-aware), written into ``out`` when given."""
    if isinstance(nodata, np.floating) and np.isnan(nodata):
        return np.isnan(x, out=out)
    return np.equal(x, nodata, out=out)


def mark_nodata(bands: np.ndarray, nodata: Any, invalid: np.ndarray, scratch: np.ndarray) -> None:
    """OR into ``invalid`` [H,W] the pixels where any band of ``bands`` [C,H,W] is nodata.

    Band by band through one [H,W] scratch: no [C,H,W] boolean temporary and no strided reduction over the band
    axis (1.6x faster than ``(x == nodata).any(axis=0)`` at 6x512x512, where that temporary leaves the cache).
    """
    for band in bands:
        np.logical_or(invalid, is_nodata(band, nodata, scratch), out=invalid)


def resolve_bands(requested: Sequence[int | str], descriptions: Sequence[str | None], count: int,
                  path: str, dataset_bands: Sequence[int | str] | None = None) -> tuple[int, ...]:
    """Map ``data.bands`` entries (0-based indexes or description names) to rasterio's 1-based band indexes.

    Args:
        requested: Band indexes (int, 0-based) or names (matched case-insensitively to band descriptions).
        descriptions: The file's band descriptions (one band group when frames are stacked as band groups).
        count: Bands available (in one group).
        path: File, for messages.
        dataset_bands: ``data.dataset_bands``: the file's bands named in order (then ``requested`` entries are
            looked up in it, as TerraTorch's ``output_bands`` in ``dataset_bands``; descriptions are not used).

    Raises:
        BadTileError: (``band-name``/``band-count``) when a band is missing from this file.
    """
    if dataset_bands is not None:
        if count != len(dataset_bands):
            raise BadTileError(path, "band-count", f"{count} bands per frame, data.dataset_bands names "
                                                   f"{len(dataset_bands)}")
        keys = [d.upper() if isinstance(d, str) else d for d in dataset_bands]
        picked = []
        for b in requested:
            key = b.upper() if isinstance(b, str) else b
            if key not in keys:
                raise BadTileError(path, "band-name", f"band {b!r} is not in data.dataset_bands {list(dataset_bands)}")
            picked.append(keys.index(key) + 1)
        return tuple(picked)
    names = {d.strip().upper(): i for i, d in reversed(list(enumerate(descriptions))) if d}
    out = []
    for b in requested:
        if isinstance(b, int):
            if b >= count:
                raise BadTileError(path, "band-count", f"band index {b} requested, file has {count} bands")
            out.append(b + 1)
        else:
            i = names.get(b.strip().upper())
            if i is None:
                have = [d for d in descriptions if d]
                raise BadTileError(
                    path, "band-name",
                    f"band {b!r} not among the band descriptions {have or '(none)'}; "
                    f"use names from that list or 0-based indexes in data.bands",
                )
            out.append(i + 1)
    return tuple(out)


class _OpenFiles:
    """A tiny per-thread LRU of open datasets (chips of one scene are read one after another).

    Local files open through GDAL's C API (``GdalDataset``, see ``encdec.data.gdal_fast``); object-store URLs,
    files it does not handle, and every file when ``ENCDEC_GDAL_FASTPATH=0`` open through rasterio.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.local = threading.local()

    def __getstate__(self) -> dict[str, int]:
        return {"size": self.size}  # open files and thread-locals stay behind (e.g. when sent to Ray tasks)

    def __setstate__(self, state: dict[str, int]) -> None:
        self.size = state["size"]
        self.local = threading.local()

    def get(self, path: str) -> Any:
        import rasterio

        cache: OrderedDict[str, Any] = getattr(self.local, "cache", None) or OrderedDict()
        self.local.cache = cache
        if path in cache:
            cache.move_to_end(path)
            return cache[path]
        ds = GdalDataset.open(path)
        if ds is None:
            ds = rasterio.open(path)
        cache[path] = ds
        while len(cache) > self.size:
            cache.popitem(last=False)[1].close()
        return ds

    def drop(self, path: str) -> None:
        cache = getattr(self.local, "cache", None)
        if cache and path in cache:
            cache.pop(path).close()


def _same_georeferencing(image: Any, mask: Any) -> bool:
    """False when both files have a CRS and their CRS or transform differ (rasterio's semantics).

    Two ``GdalDataset``: equal transforms and byte-identical GeoKeys (the common case, no PROJ lookup) are the
    same georeferencing; otherwise WKT strings are compared, and only differing strings build CRS objects, which
    may still be equal (the same CRS written two ways).
    """
    if isinstance(image, GdalDataset) and isinstance(mask, GdalDataset):
        same_transform = mask.transform.almost_equals(image.transform)
        keys = image.geokeys()
        if same_transform and keys is not None and keys == mask.geokeys():
            return True
        if not (image.wkt and mask.wkt):
            return True
        if image.wkt == mask.wkt:
            return same_transform
        return bool(same_transform and image.crs == mask.crs)
    return not (image.crs and mask.crs and (mask.crs != image.crs or not mask.transform.almost_equals(
        image.transform)))


@dataclass
class ReadResult:
    """Per-sample extras beside the pixels written into the slots."""

    valid_fraction: float
    location: tuple[float, float] | None = None


class TileReader:
    """Reads samples into batch slots.

    Args:
        bands: ``data.bands`` (names or 0-based indexes).
        normalizer: Per-band normaliser (one mean/std per band in ``bands``).
        img_size: Output height and width.
        num_frames: Frames per sample (``[C,T,H,W]`` when > 1).
        target: ``mask`` (int64, -1 ignore), ``regression`` (float32, NaN ignore), ``label`` or ``none``.
        location_coords: Compute ``(lat, lon)`` of each window's centre from the tile's CRS.
    """

    def __init__(self, *, bands: Sequence[int | str], normalizer: Normalizer, img_size: int, num_frames: int = 1,
                 target: str = "mask", location_coords: bool = False,
                 dataset_bands: Sequence[int | str] | None = None, no_label_replace: int | None = None,
                 min_valid_fraction: float = 0.0) -> None:
        if target not in TARGETS:
            raise ValueError(f"target={target!r}; allowed {TARGETS}")
        self.bands = tuple(bands)
        self.normalizer = normalizer
        self.img_size = img_size
        self.num_frames = num_frames
        self.target = target
        self.location_coords = location_coords
        self.dataset_bands = None if dataset_bands is None else tuple(dataset_bands)
        self.no_label_replace = no_label_replace
        self.min_valid_fraction = min_valid_fraction
        self.files = _OpenFiles()
        self._band_cache: dict[tuple[Any, ...], tuple[int, ...]] = {}
        self._scratch = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_scratch"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._scratch = threading.local()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _open(self, path: str) -> Any:
        try:
            return self.files.get(path)
        except Exception as e:  # rasterio raises RasterioIOError and friends; all mean "unreadable"
            raise BadTileError(path, "unreadable", f"{type(e).__name__}: {e}") from e

    def _indexes(self, ds: Any, path: str, groups: int) -> list[tuple[int, ...]]:
        """Band indexes per frame for one file holding ``groups`` frames as band groups."""
        if ds.count % groups:
            raise BadTileError(path, "band-count", f"{ds.count} bands do not split into {groups} frames")
        per = ds.count // groups
        key = (per, tuple(ds.descriptions[:per]))
        idx = self._band_cache.get(key)
        if idx is None:
            idx = resolve_bands(self.bands, ds.descriptions[:per], per, path, self.dataset_bands)
            self._band_cache[key] = idx
        return [tuple(i + t * per for i in idx) for t in range(groups)]

    def _buffer(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        cache: dict[tuple[Any, ...], np.ndarray] = getattr(self._scratch, "bufs", None) or {}
        self._scratch.bufs = cache
        key = (np.dtype(dtype).str, shape)
        buf = cache.get(key)
        if buf is None:
            buf = cache[key] = np.empty(shape, dtype=dtype)
        return buf

    def window_for(self, sample: Sample, height: int, width: int, params: aug.AugmentParams,
                   path: str) -> tuple[int, int, int, int]:
        """The ``(row, col, h, w)`` window to read: the chip, or an ``img_size`` crop of a larger tile."""
        if sample.window is not None:
            return sample.window
        s = self.img_size
        if height < s or width < s:
            raise BadTileError(path, "size", f"{height}x{width} pixels is smaller than data.img_size={s}")
        return (aug.crop_offset(height, s, params.crop[0]), aug.crop_offset(width, s, params.crop[1]), s, s)

    @staticmethod
    def _read_window(ds: Any, indexes: Sequence[int] | int, win: tuple[int, int, int, int], out: np.ndarray,
                     fill: float) -> None:
        """Read ``win`` into ``out``; parts outside the raster (edge chips) are filled with ``fill``."""
        from rasterio.windows import Window

        r, c, h, w = win
        r0, c0, r1, c1 = max(r, 0), max(c, 0), min(r + h, ds.height), min(c + w, ds.width)
        inside = (r0, c0, r1, c1) == (r, c, r + h, c + w)
        if isinstance(ds, GdalDataset):
            band_list = [indexes] if isinstance(indexes, int) else list(indexes)
            if not inside:
                out[...] = fill
            if r1 > r0 and c1 > c0:  # GDAL writes the inside part straight into the strided view
                ds.read_into(band_list, (r0, c0, r1 - r0, c1 - c0), out[..., r0 - r:r1 - r, c0 - c:c1 - c])
            return
        if inside:
            ds.read(indexes, window=Window(c, r, w, h), out=out)
            return
        out[...] = fill
        if r1 > r0 and c1 > c0:
            # rasterio wants a contiguous ``out``: read the inside part alone, then place it.
            part = ds.read(indexes, window=Window(c0, r0, c1 - c0, r1 - r0))
            out[..., r0 - r:r1 - r, c0 - c:c1 - c] = part

    # -- the read --------------------------------------------------------------------------------------------

    def read(self, sample: Sample, image_out: np.ndarray, target_out: np.ndarray | None,
             params: aug.AugmentParams = aug.NO_AUGMENT) -> ReadResult:
        """Read one sample into ``image_out`` ([C,H,W] or [C,T,H,W] float32) and ``target_out`` ([H,W]).

        Raises:
            BadTileError: Unreadable file, wrong band count/size, mask mismatch, all-nodata window.
        """
        try:
            return self._read(sample, image_out, target_out, params)
        finally:
            if sample.window is None:
                # A whole tile is read once per epoch: close its files now, so GDAL frees their cached blocks at
                # once (a warm allocation for the next tile) instead of holding 4 tiles' blocks in the LRU,
                # which only pays off for chips of one scene read one after another.
                for path in (*sample.images, sample.mask):
                    if path is not None:
                        self.files.drop(path)

    def _read(self, sample: Sample, image_out: np.ndarray, target_out: np.ndarray | None,
              params: aug.AugmentParams) -> ReadResult:
        t_frames = self.num_frames
        if len(sample.images) not in (1, t_frames):
            raise BadTileError(sample.images[0], "frames",
                               f"{len(sample.images)} files for data.num_frames={t_frames}")
        groups = t_frames if len(sample.images) == 1 else 1
        first = self._open(sample.images[0])
        win = self.window_for(sample, first.height, first.width, params, sample.images[0])
        c, s = len(self.bands), self.img_size
        if win[2:] != (s, s):
            raise BadTileError(sample.images[0], "size", f"window {win[2]}x{win[3]} is not data.img_size={s}")
        # Frame-major scratch so each frame's read target is contiguous; viewed as [C,T,H,W] below.
        raw = self._buffer(first.dtypes[0], (t_frames, c, s, s))
        invalid = self._buffer(np.bool_, (s, s))
        invalid[...] = False
        for f, path in enumerate(sample.images):
            ds = first if f == 0 else self._open(path)
            if (ds.height, ds.width) != (first.height, first.width) or ds.dtypes[0] != first.dtypes[0]:
                raise BadTileError(path, "size", f"frame {f} is {ds.height}x{ds.width} {ds.dtypes[0]}, frame 0 "
                                                 f"is {first.height}x{first.width} {first.dtypes[0]}")
            nodata = typed_nodata(raw.dtype, ds.nodata)
            fill = nodata if nodata is not None else 0
            for g, idx in enumerate(self._indexes(ds, path, groups)):
                t = f + g
                try:
                    self._read_window(ds, list(idx), win, raw[t], fill)
                except BadTileError:
                    raise
                except Exception as e:
                    self.files.drop(path)
                    raise BadTileError(path, "unreadable", f"{type(e).__name__}: {e}") from e
                if nodata is not None:
                    mark_nodata(raw[t], nodata, invalid, self._buffer(np.bool_, (1, s, s))[0])  # (1,s,s): not `invalid`
            if sample.window is not None and nodata is None:
                self._mark_outside(invalid, win, ds.height, ds.width)
        valid_fraction = 1.0 - np.count_nonzero(invalid) / invalid.size  # 8x faster than a float64 mean
        if valid_fraction == 0.0:
            raise EmptyTileError(sample.images[0], "all-nodata", f"every pixel of window {win} is nodata")
        if valid_fraction < self.min_valid_fraction:
            raise EmptyTileError(sample.images[0], "nearly-empty", f"{valid_fraction:.1%} of window {win} is valid, "
                                                                   f"below data.min_valid_fraction={self.min_valid_fraction}")
        view = aug.apply(raw.transpose(1, 0, 2, 3) if t_frames > 1 else raw[0], params)
        # Most tiles have no nodata pixel: skip the masked write then.
        self.normalizer(view, image_out, aug.apply(invalid, params) if valid_fraction < 1.0 else None,
                        nodata=typed_nodata(raw.dtype, first.nodata))
        if target_out is not None and self.target in ("mask", "regression"):
            self._read_target(sample, first, win, invalid, params, target_out)
        location = sample.location
        if location is None and self.location_coords:
            location = self._centre(first, win)
        return ReadResult(valid_fraction=valid_fraction, location=location)

    @staticmethod
    def _mark_outside(invalid: np.ndarray, win: tuple[int, int, int, int], height: int, width: int) -> None:
        r, c, h, w = win
        rows = np.arange(r, r + h)
        cols = np.arange(c, c + w)
        outside = (rows[:, None] < 0) | (rows[:, None] >= height) | (cols[None, :] < 0) | (cols[None, :] >= width)
        np.logical_or(invalid, outside, out=invalid)

    def _read_target(self, sample: Sample, image_ds: Any, win: tuple[int, int, int, int], invalid: np.ndarray,
                     params: aug.AugmentParams, out: np.ndarray) -> None:
        if sample.mask is None:
            raise BadTileError(sample.images[0], "mask-mismatch", "no mask paired with this image")
        mds = self._open(sample.mask)
        if (mds.height, mds.width) != (image_ds.height, image_ds.width):
            raise BadTileError(sample.mask, "mask-mismatch", f"mask is {mds.height}x{mds.width}, image is "
                                                             f"{image_ds.height}x{image_ds.width}")
        if mds.count != 1:
            raise BadTileError(sample.mask, "mask-mismatch", f"mask has {mds.count} bands, expected 1")
        try:
            same = _same_georeferencing(image_ds, mds)
        except Exception as e:  # the fast path may reopen a file for its CRS; a file gone since is unreadable
            raise BadTileError(sample.mask, "unreadable", f"{type(e).__name__}: {e}") from e
        if not same:
            raise BadTileError(sample.mask, "mask-mismatch", "mask georeferencing differs from the image's")
        s = self.img_size
        raw = self._buffer(mds.dtypes[0], (s, s))
        ignore_value = typed_nodata(raw.dtype, mds.nodata)
        try:
            self._read_window(mds, 1, win, raw, ignore_value if ignore_value is not None else 0)
        except Exception as e:
            self.files.drop(sample.mask)
            raise BadTileError(sample.mask, "unreadable", f"{type(e).__name__}: {e}") from e
        # With data.no_data_replace the image's nodata pixels are inputs like any other and keep their labels
        # (TerraTorch); otherwise their labels are ignored. The label's own nodata: no_label_replace or ignore.
        replaced = self.normalizer.no_data_replace is not None
        ignore = (np.zeros_like(invalid) if replaced else invalid) if ignore_value is None else \
            ((is_nodata(raw, ignore_value)) if replaced else (invalid | is_nodata(raw, ignore_value)))
        if self.no_label_replace is not None:
            fill: Any = self.no_label_replace
        else:
            fill = -1 if self.target == "mask" else np.nan
        np.copyto(out, aug.apply(raw, params), casting="unsafe")
        np.copyto(out, fill, where=aug.apply(ignore, params))

    @staticmethod
    def _centre(ds: Any, win: tuple[int, int, int, int]) -> tuple[float, float] | None:
        if ds.crs is None:
            return None
        from rasterio.warp import transform

        r, c, h, w = win
        x, y = ds.transform @ (c + w / 2.0, r + h / 2.0)
        lon, lat = transform(ds.crs, "EPSG:4326", [x], [y])
        return float(lat[0]), float(lon[0])

    def probe_target(self, sample: Sample) -> str:
        """The target kind a sample implies: ``label`` (manifest label), ``regression`` (float mask), ``mask``."""
        if sample.label is not None:
            return "label"
        if sample.mask is None:
            return "none"
        ds = self._open(sample.mask)
        return "regression" if np.dtype(ds.dtypes[0]).kind == "f" else "mask"

    def close(self) -> None:
        """Close this thread's open files (other threads' handles close when the threads end)."""
        cache = getattr(self.files.local, "cache", None)
        while cache:
            cache.popitem()[1].close()
