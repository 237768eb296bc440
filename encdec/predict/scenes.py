"""Finding the scenes to predict (files, folders, globs, manifests, GDAL remote paths) and reading their headers.

Reading a header opens the file with rasterio only (no pixels, no code from the file runs).
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encdec.data.sources import FRAME_SEPARATOR

__all__ = ["SceneError", "SceneInfo", "discover_scenes", "gdal_path", "open_scene", "scene_name"]

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
MANIFEST_SUFFIXES = (".txt", ".csv", ".lst")
REMOTE_PREFIXES = ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/", "/vsihttp", "/vsizip/", "/vsigzip/")


class SceneError(ValueError):
    """A scene (or a scene argument) that cannot be predicted; the message names the file and the fix."""


def gdal_path(path: str) -> str:
    """``s3://b/k`` -> ``/vsis3/b/k``, ``http(s)://...`` -> ``/vsicurl/http(s)://...``; other paths unchanged."""
    if path.startswith("s3://"):
        return "/vsis3/" + path[len("s3://"):]
    if path.startswith(("gs://",)):
        return "/vsigs/" + path[len("gs://"):]
    if path.startswith(("http://", "https://")):
        return "/vsicurl/" + path
    return path


def _is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES) or gdal_path(path) != path


def _read_manifest(path: Path) -> list[str]:
    """One path per line (``.txt``/``.lst``), or a CSV with an ``image`` or ``scene`` column; relative paths are
    relative to the manifest's folder."""
    entries: list[str] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            col = next((c for c in ("scene", "image", "path") if c in (reader.fieldnames or [])), None)
            if col is None:
                raise SceneError(f"manifest {path} has columns {reader.fieldnames}: allowed a 'scene', 'image' or "
                                 f"'path' column. Fix: name the column of scene paths 'scene'.")
            entries = [row[col].strip() for row in reader if row.get(col, "").strip()]
    else:
        entries = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    from encdec.predict.rasters import frames_of

    out = []
    for e in entries:  # "a.tif|b.tif": one file per date, each relative to the manifest
        out.append(FRAME_SEPARATOR.join(f if _is_remote(f) or os.path.isabs(f) else str(path.parent / f)
                                        for f in frames_of(e)))
    return out


def discover_scenes(args: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand scene arguments into an ordered, de-duplicated list of paths GDAL can open.

    Args:
        args: Files, folders (their ``*.tif``/``*.tiff``, not recursive), globs, manifests (``.txt``/``.lst``: one
            path a line; ``.csv``: a ``scene``/``image``/``path`` column), or remote paths (``/vsicurl/``,
            ``/vsis3/``, ``s3://``, ``http(s)://``); ``a.tif|b.tif`` is one multi-temporal scene, one file per
            date (as in training manifests; in manifests too).

    Raises:
        SceneError: an argument matches nothing; the message lists every such argument.
    """
    from encdec.predict.rasters import frames_of

    found: list[str] = []
    missing: list[str] = []
    for raw in args:
        arg = str(raw)
        if FRAME_SEPARATOR in arg:  # a multi-temporal scene, one file per date: each must exist (or be remote)
            frames = frames_of(arg)
            absent = [f for f in frames if not (_is_remote(f) or Path(f).is_file())]
            (missing.extend(f"{f} (a frame of {arg})" for f in absent) if absent
             else found.append(FRAME_SEPARATOR.join(gdal_path(f) for f in frames)))
            continue
        if _is_remote(arg):
            found.append(gdal_path(arg))
            continue
        p = Path(arg)
        if any(ch in arg for ch in "*?["):
            hits = sorted(h for h in glob.glob(arg, recursive=True) if h.lower().endswith(RASTER_SUFFIXES))
            (found.extend(hits) if hits else missing.append(arg))
        elif p.is_dir():
            hits = sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.lower().endswith(RASTER_SUFFIXES))
            (found.extend(hits) if hits else missing.append(f"{arg} (a folder with no .tif/.tiff)"))
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            found.extend(discover_scenes(_read_manifest(p)))
        elif p.is_file():
            found.append(str(p))
        else:
            missing.append(arg)
    if missing:
        raise SceneError(f"no scene found for {missing}: allowed GeoTIFF/COG files, folders of them, globs, "
                         f"manifests (.txt/.csv) and /vsicurl/, /vsis3/, s3:// paths. Fix: check the paths.")
    seen: set[str] = set()
    return [s for s in found if not (s in seen or seen.add(s))]  # type: ignore[func-returns-value]


def scene_name(path: str) -> str:
    """Output stem of a scene: its (first date's) file name without the raster suffix."""
    name = path.split(FRAME_SEPARATOR, 1)[0].rstrip("/").rsplit("/", 1)[-1]
    for suf in RASTER_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


@dataclass(frozen=True)
class SceneInfo:
    """What predict needs from a scene's header."""

    path: str
    name: str
    height: int
    width: int
    count: int
    dtype: str
    crs: Any
    transform: Any
    nodata: float | None
    band_names: tuple[str | None, ...]
    band_index: tuple[int, ...] = field(default=())  # 1-based bands to read, in model order
    frames: int = 1  # files (dates) the scene is read from; their bands follow each other

    @property
    def bands_read(self) -> tuple[int, ...]:
        """The 1-based band indexes read (all bands when no selection was made)."""
        return self.band_index or tuple(range(1, self.count + 1))


def _select_bands(path: str, names: tuple[str | None, ...], count: int,
                  bands: Sequence[int | str] | None) -> tuple[int, ...]:
    if bands is None:
        return ()
    if all(not n for n in names) and count == len(bands) and any(isinstance(b, str) for b in bands):
        return ()  # a file without band names holding exactly the model's bands: taken in order, as in training
    idx: list[int] = []
    for b in bands:
        if isinstance(b, int):
            if not 1 <= b <= count:
                raise SceneError(f"{path}: band {b} does not exist (the file has {count} bands, 1-based). "
                                 f"Fix: bands between 1 and {count}, or band names.")
            idx.append(b)
        else:
            lowered = [(n or "").lower() for n in names]
            if b.lower() not in lowered:
                raise SceneError(f"{path}: no band named {b!r} (its band descriptions are {list(names)}). Fix: "
                                 f"name the bands in the file (band descriptions) or give 1-based band indexes.")
            idx.append(lowered.index(b.lower()) + 1)
    return tuple(idx)


def open_scene(path: str, *, bands: Sequence[int | str] | None = None, expect_bands: int | None = None,
               require_crs: bool = True) -> SceneInfo:
    """Read a scene's header and check it can be predicted.

    Args:
        path: A path GDAL opens.
        bands: Bands to read, in the model's order: 1-based indexes or band names (matched against the file's
            band descriptions, case-insensitive); ``None`` reads all bands.
        expect_bands: The number of bands the model takes (checked against the selection).
        require_crs: Refuse files without a CRS (their outputs could not be placed on a map).

    Raises:
        SceneError: unreadable file, missing CRS, wrong band count or names.
    """
    import rasterio

    from encdec.predict.rasters import frames_of

    frames = frames_of(path)
    try:
        heads = []
        for f in frames:
            with rasterio.open(f) as src:
                heads.append(SceneInfo(f, scene_name(f), src.height, src.width, src.count, src.dtypes[0], src.crs,
                                       src.transform, src.nodata, tuple(src.descriptions)))
    except rasterio.errors.RasterioIOError as e:
        raise SceneError(f"{path}: cannot be read as a raster ({e}). Fix: check the path, its permissions, and "
                         f"for remote paths the network/credentials (AWS_* variables for /vsis3/).") from e
    first = heads[0]
    for h in heads[1:]:
        grid = [("size", (h.height, h.width), (first.height, first.width)), ("dtype", h.dtype, first.dtype),
                ("CRS", h.crs, first.crs), ("transform", h.transform, first.transform),
                ("nodata", h.nodata, first.nodata)]
        for what, got, want in grid:
            if got != want and not (what == "nodata" and got != got and want != want):  # NaN == NaN here
                raise SceneError(f"{h.path}: its {what} {got} differs from the scene's first date {first.path} "
                                 f"({want}); the dates of a multi-temporal scene must share one grid. Fix: warp "
                                 f"them onto one grid (gdalwarp -te/-tr/-t_srs of the first).")
    names = tuple(n for h in heads for n in h.band_names)
    info = SceneInfo(path, first.name, first.height, first.width, sum(h.count for h in heads), first.dtype,
                     first.crs, first.transform, first.nodata, names, frames=len(heads))
    if require_crs and info.crs is None:
        raise SceneError(f"{path}: has no CRS, so its output could not be georeferenced. Fix: assign one "
                         f"(gdal_edit.py -a_srs EPSG:XXXX {path}) or pass require_crs=False.")
    sel = _select_bands(path, names, info.count, bands)
    n = len(sel) if sel else info.count
    if expect_bands is not None and n != expect_bands:
        raise SceneError(f"{path}: {n} bands selected, the model takes {expect_bands}. Fix: select the model's "
                         f"bands by name or index (bands=[...], `--set data.bands=[...]`).")
    return SceneInfo(**{**info.__dict__, "band_index": sel})
