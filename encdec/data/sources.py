"""Where samples come from: tile folders and globs (paired by a naming rule), manifests (CSV/Parquet), scenes.

Every source becomes the same flat, ordered list of ``Sample`` records, identical on every rank (sorted paths or
manifest order), so a sample's position in the list is its ``sample_id``.

Paths: local paths, globs and URLs. All path handling goes through ``is_url`` / ``join`` / ``expand``; local
paths use the standard library and URLs (``s3://``, ``gs://``, ``https://``) go to fsspec for listing and to
rasterio (GDAL's /vsis3/, /vsigs/, /vsicurl/) for reading, so object stores need credentials, not a redesign.
"""

from __future__ import annotations

import csv
import datetime as dt
import glob as globlib
import io
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from encdec.config import DataSource
from encdec.config.data_layout import SplitLayout
from encdec.data.config import DataConfigError

FRAME_SEPARATOR = "|"
MANIFEST_COLUMNS = ("image", "mask", "split", "label", "time", "lat", "lon")


@dataclass(frozen=True)
class Sample:
    """One training sample.

    Attributes:
        images: Image file(s): one file (all frames as band groups) or one file per frame.
        mask: Target raster, or ``None``.
        window: ``(row_off, col_off, height, width)`` for a chip of a scene; ``None`` means the whole tile.
        label: Class index (or scalar target) from a manifest.
        times: ``(year, day_of_year)`` per frame, from a manifest.
        location: ``(lat, lon)`` from a manifest (otherwise the reader takes the tile's CRS centre).
    """

    images: tuple[str, ...]
    mask: str | None = None
    window: tuple[int, int, int, int] | None = None
    label: float | None = None
    times: tuple[tuple[int, int], ...] | None = None
    location: tuple[float, float] | None = None

    @property
    def key(self) -> str:
        """Identity for bad-tile bookkeeping (a chip is its scene plus window)."""
        base = FRAME_SEPARATOR.join(self.images)
        return base if self.window is None else f"{base}@{self.window}"


# ---- paths -----------------------------------------------------------------------------------------------------


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in path


def join(base: str, path: str) -> str:
    """Resolve ``path`` against the folder ``base`` (absolute paths and URLs are returned unchanged)."""
    if is_url(path) or os.path.isabs(path):
        return path
    if is_url(base):
        return posixpath.join(base, path)
    return os.path.normpath(os.path.join(base, path))


def dirname(path: str) -> str:
    """Folder of a local path or URL."""
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(os.path.abspath(path))


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _fs(url: str) -> Any:
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec ships with ray[data]
        raise DataConfigError(f"listing {url!r} needs fsspec. Fix: pip install fsspec (and s3fs or gcsfs).") from e
    protocol = url.split("://", 1)[0]
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as e:
        raise DataConfigError(
            f"no filesystem for {protocol}:// ({e}). Fix: pip install s3fs (s3://) or gcsfs (gs://)."
        ) from e


def expand(pattern: str, suffix: str | None = None) -> list[str]:
    """List the files named by a folder, a glob, or a single file, sorted.

    Args:
        pattern: Folder (files ending in ``suffix`` inside it), glob (``**`` recurses) or file.
        suffix: File-name ending to keep when ``pattern`` is a folder.

    Returns:
        Sorted file paths (URLs keep their scheme).
    """
    if is_url(pattern):
        fs = _fs(pattern)
        protocol = pattern.split("://", 1)[0]
        if _has_magic(pattern):
            found = fs.glob(pattern)
        elif fs.isdir(pattern):
            found = [p for p in fs.ls(pattern, detail=False) if suffix is None or p.endswith(suffix)]
        else:
            found = [pattern]
        return sorted(p if is_url(p) else f"{protocol}://{p}" for p in found)
    if _has_magic(pattern):
        return sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    if os.path.isdir(pattern):
        with os.scandir(pattern) as it:
            return sorted(e.path for e in it if e.is_file() and (suffix is None or e.name.endswith(suffix)))
    if os.path.isfile(pattern):
        return [pattern]
    return []


def open_text(path: str) -> io.TextIOBase:
    """Open a local or remote text file."""
    if is_url(path):
        return _fs(path).open(path, "rt")
    return open(path, newline="")


# ---- tile folders ----------------------------------------------------------------------------------------------


def pair_tiles(paths: Iterable[str], image_suffix: str, mask_suffix: str | None) -> list[Sample]:
    """Pair image files with masks by the naming rule ``<stem><image_suffix>`` <-> ``<stem><mask_suffix>``.

    Files ending in ``mask_suffix`` are masks, never images; a missing mask is found (and counted as a bad tile)
    when the sample is read, so listing stays one directory scan.
    """
    samples = []
    for path in paths:
        if mask_suffix and path.endswith(mask_suffix):
            continue
        if not path.endswith(image_suffix):
            continue
        mask = path[: -len(image_suffix)] + mask_suffix if mask_suffix else None
        samples.append(Sample(images=(path,), mask=mask))
    return samples


def list_tiles(spec: DataSource, where: str) -> list[Sample]:
    """Samples of a ``tiles:`` source (folders/globs), sorted by path."""
    paths: list[str] = []
    for pattern in spec.tile_paths:
        found = expand(pattern, spec.image_suffix)
        if not found:
            raise DataConfigError(
                f"{where}.tiles={pattern!r} matches no files ending in {spec.image_suffix!r}. Fix: check the path, "
                f"or set {where}.image_suffix / {where}.mask_suffix to your naming rule."
            )
        paths.extend(found)
    samples = pair_tiles(sorted(set(paths)), spec.image_suffix, spec.mask_suffix)
    if not samples:
        raise DataConfigError(
            f"{where}.tiles={list(spec.tile_paths)!r} holds no image files ending in {spec.image_suffix!r}. "
            f"Fix: set {where}.image_suffix to the ending of your image files."
        )
    return samples


# ---- image/label folders with globs and a split file (TerraTorch's generic layout) -----------------------------


def _split_ids(path: str, where: str) -> list[str]:
    try:
        with open_text(path) as f:
            return [line.strip() for line in f.readlines()]  # TerraTorch keeps blank lines too (matching all)
    except OSError as e:
        raise DataConfigError(f"{where}.split_file={path!r} cannot be read ({e}). Fix: give the split file's path, "
                              f"a text file of sample ids, one a line.") from e


def keep_listed(paths: Sequence[str], ids: Iterable[str], *, ignore_extensions: bool, substring: bool) -> list[str]:
    """The files a split file selects, as TerraTorch's ``filter_valid_files`` does, sorted.

    An id (its extension dropped when ``ignore_extensions``) selects a file when it occurs in the file's base name
    (extension dropped too), or when it equals it if not ``substring``. A blank line matches every file, as there.
    """
    wanted = [posixpath.splitext(i)[0] if ignore_extensions else i for i in set(ids)]
    exact = set(wanted)
    out = []
    for path in paths:
        base = posixpath.basename(path.replace(os.sep, "/"))
        if ignore_extensions:
            base = posixpath.splitext(base)[0]
        if (not substring and base in exact) or (substring and any(w in base for w in wanted)):
            out.append(path)
    return sorted(out)


def list_layout(layout: SplitLayout, where: str) -> list[Sample]:
    """Samples of an ``image_root`` source: images and labels listed by glob, filtered by the split file, paired
    by sorted position (TerraTorch's ``GenericPixelWiseDataset``), with a check that the counts agree."""
    root = layout.image_root or ""
    label_root = layout.label_root or root
    images = expand(join(root, layout.image_glob))
    labels: list[str] = []
    if layout.label_glob is not None:
        labels = expand(join(label_root, layout.label_glob))
    if not images:
        raise DataConfigError(f"{where}.image_root={root!r} with {where}.image_glob={layout.image_glob!r} matches no "
                              f"files. Fix: check the folder and the glob (e.g. '*_S2Hand.tif').")
    # A label glob that also matches the images (``*`` in one folder) would pair images with themselves.
    labels = [p for p in labels if p not in set(images)] if label_root == root else labels
    if layout.split_file is not None:
        ids = _split_ids(layout.split_file, where)
        opts = {"ignore_extensions": layout.split_file_ignore_extensions, "substring": layout.split_file_substring}
        images, labels = keep_listed(images, ids, **opts), keep_listed(labels, ids, **opts)
        if not images:
            raise DataConfigError(
                f"{where}.split_file={layout.split_file!r} selects none of the files matching {where}.image_glob "
                f"(ids like {ids[:3]}). Fix: check that the ids are parts of the image file names.")
    if layout.label_glob is not None and len(labels) != len(images):
        raise DataConfigError(
            f"{where}: {len(images)} images ({layout.image_glob!r} in {root!r}) but {len(labels)} labels "
            f"({layout.label_glob!r} in {label_root!r}); they are paired by sorted position, so the counts must "
            f"match. Fix: narrow {where}.image_glob / {where}.label_glob (e.g. '*_merged.tif' and '*.mask.tif').")
    if layout.label_glob is None:
        return [Sample(images=(p,)) for p in images]
    return [Sample(images=(i,), mask=m) for i, m in zip(images, labels, strict=True)]


# ---- manifests -------------------------------------------------------------------------------------------------


def parse_time(value: str, where: str) -> tuple[int, int]:
    """``YYYY-MM-DD`` or ``YYYY-DDD`` (day of year) -> ``(year, day_of_year)``."""
    text = value.strip()
    try:
        if len(text) == 8 and text[4] == "-":
            year, doy = int(text[:4]), int(text[5:])
            if not 1 <= doy <= 366:
                raise ValueError(text)
            return year, doy
        day = dt.date.fromisoformat(text[:10])
        return day.year, day.timetuple().tm_yday
    except ValueError as e:
        raise DataConfigError(
            f"{where}: time {value!r} is not a date; allowed YYYY-MM-DD or YYYY-DDD, '|'-separated per frame."
        ) from e


def _read_rows(path: str) -> list[dict[str, Any]]:
    if path.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        if is_url(path):
            with _fs(path).open(path, "rb") as f:
                table = pq.read_table(f)
        else:
            table = pq.read_table(path)
        return table.to_pylist()
    with open_text(path) as f:
        return list(csv.DictReader(f))


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def read_manifest(path: str, split: str | None, where: str) -> list[Sample]:
    """Samples listed in a CSV or Parquet manifest.

    Columns: ``image`` (required; ``|`` separates one file per frame), ``mask``, ``split`` (rows kept when equal
    to ``split``), ``label``, ``time`` (``|``-separated dates per frame), ``lat``, ``lon``. Relative paths are
    resolved against the manifest's folder.
    """
    try:
        rows = _read_rows(path)
    except (OSError, ValueError) as e:
        raise DataConfigError(f"{where}.manifest={path!r} cannot be read ({e}). Fix: give a CSV or Parquet file.") from e
    if rows and "image" not in rows[0]:
        raise DataConfigError(
            f"{where}.manifest={path!r} has no 'image' column (columns: {list(rows[0])}). "
            f"Fix: name the image path column 'image'; optional: {list(MANIFEST_COLUMNS[1:])}."
        )
    base = dirname(path)
    has_split = bool(rows) and "split" in rows[0]
    samples = []
    for i, row in enumerate(rows):
        if has_split and split is not None and str(row.get("split", "")).strip() != split:
            continue
        at = f"{where}.manifest row {i + 1}"
        images = tuple(join(base, p.strip()) for p in str(row["image"]).split(FRAME_SEPARATOR))
        mask = None if _empty(row.get("mask")) else join(base, str(row["mask"]).strip())
        label = None if _empty(row.get("label")) else float(row["label"])
        times = None
        if not _empty(row.get("time")):
            times = tuple(parse_time(t, at) for t in str(row["time"]).split(FRAME_SEPARATOR))
        location = None
        if not _empty(row.get("lat")) and not _empty(row.get("lon")):
            location = (float(row["lat"]), float(row["lon"]))
        samples.append(Sample(images=images, mask=mask, label=label, times=times, location=location))
    if not samples:
        raise DataConfigError(
            f"{where}.manifest={path!r} has no rows for split {split!r}. Fix: check its 'split' column "
            f"or set {where}.split to the value used there."
        )
    return samples


# ---- one entry point -------------------------------------------------------------------------------------------


def list_samples(spec: DataSource, *, img_size: int, where: str, split: str | None) -> list[Sample]:
    """The ordered samples of one split, from whichever source it names.

    Args:
        spec: The split's source (``data.train`` ...).
        img_size: Chip size for ``scenes`` sources.
        where: Config path for messages (``data.train``).
        split: The split's name: a manifest's rows are those whose ``split`` column equals ``spec.split``, else
            this name; None (and no ``spec.split``) takes every row.
    """
    if spec.layout is not None:
        return list_layout(spec.layout, where)
    if spec.manifest:
        return read_manifest(spec.manifest, spec.split or split, where)
    if spec.scenes:
        from encdec.data.chips import chip_scenes

        scenes = list_tiles(DataSource.model_validate({"tiles": list(spec.scene_paths), "image_suffix": spec.image_suffix,
                                                       "mask_suffix": spec.mask_suffix}), where)
        return chip_scenes(scenes, img_size=img_size, stride=spec.stride or img_size)
    return list_tiles(spec, where)


def describe(samples: Sequence[Sample]) -> Mapping[str, Any]:
    """Small summary for logs."""
    return {
        "samples": len(samples),
        "frames_per_sample": len(samples[0].images) if samples else 0,
        "with_mask": sum(s.mask is not None for s in samples),
        "chips": sum(s.window is not None for s in samples),
    }
