"""Local tile reads through GDAL's C API (ctypes), on the libgdal rasterio has already loaded.

``rasterio.open`` costs ~0.5-0.8 ms per file on top of GDAL's own open, mostly building the CRS object, and a
tile is two files (image + mask): that overhead, not decoding, bounds small-tile throughput (benchmarks/README.md,
data section). ``GdalDataset`` opens the same file through the same libgdal (found among the shared objects already
mapped into this process, never a second copy) and exposes only what ``TileReader`` uses: size, band count,
dtypes, nodata, band descriptions, geotransform, and windowed reads straight into a numpy view. Georeferencing is
looked up lazily: ``GDALGetProjectionRef`` is not cheap on a GeoTIFF (GDAL builds the spatial reference through
PROJ on that call, ~0.5 ms for a UTM tile, the bulk of rasterio's open cost), so an image and its mask are first
compared by their raw GeoKey tags (byte-identical keys = same CRS), then by WKT strings, and CRS objects are built
only for differing strings or location coordinates. Anything it does not handle opens through rasterio instead: object-store URLs and ``/vsi`` paths, data
types without a plain numpy twin, or ``ENCDEC_GDAL_FASTPATH=0``.

Each ``GdalDataset`` is used by one thread (the reader keeps per-thread handles); ctypes releases the GIL during
GDAL calls, so reader threads decode in parallel as they do through rasterio.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

ENV_SWITCH = "ENCDEC_GDAL_FASTPATH"

# GDALDataType -> numpy dtype name; others (complex, 64-bit integers) go through rasterio.
_GDT_TO_NUMPY = {1: "uint8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "float64",
                 14: "int8"}
_NUMPY_TO_GDT = {v: k for k, v in _GDT_TO_NUMPY.items()}
_GDAL_OF_RASTER, _GDAL_OF_VERBOSE_ERROR = 0x02, 0x40  # read-only is 0
_GF_READ = 0

_lock = threading.Lock()
_lib: Any = None
_lib_loaded = False


class GdalError(RuntimeError):
    """A GDAL call failed; the message is GDAL's own (``CPLGetLastErrorMsg``)."""


def _loaded_libgdal() -> str | None:
    """Path of the libgdal shared object already mapped into this process (rasterio's), or ``None``."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith("libgdal") and ".so" in path:
                    return path
    except OSError:  # no /proc (not Linux): stay on rasterio
        return None
    return None


def _bind(lib: Any) -> Any:
    c_void_p, c_int, c_char_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    sig = {
        "GDALOpenEx": (c_void_p, [c_char_p, ctypes.c_uint, c_void_p, c_void_p, c_void_p]),
        "GDALClose": (None, [c_void_p]),
        "GDALGetRasterXSize": (c_int, [c_void_p]),
        "GDALGetRasterYSize": (c_int, [c_void_p]),
        "GDALGetRasterCount": (c_int, [c_void_p]),
        "GDALGetRasterBand": (c_void_p, [c_void_p, c_int]),
        "GDALGetRasterDataType": (c_int, [c_void_p]),
        "GDALGetRasterNoDataValue": (ctypes.c_double, [c_void_p, ctypes.POINTER(c_int)]),
        "GDALGetDescription": (c_char_p, [c_void_p]),
        "GDALGetMetadataItem": (c_char_p, [c_void_p, c_char_p, c_char_p]),
        "GDALGetGeoTransform": (c_int, [c_void_p, ctypes.POINTER(ctypes.c_double)]),
        "GDALGetProjectionRef": (c_char_p, [c_void_p]),
        "GDALDatasetRasterIOEx": (c_int, [c_void_p, c_int, c_int, c_int, c_int, c_int, c_void_p, c_int, c_int,
                                          c_int, c_int, ctypes.POINTER(c_int), ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_int64, c_void_p]),
        "CPLErrorReset": (None, []),
        "CPLPushErrorHandler": (None, [c_void_p]),
        "CPLPopErrorHandler": (None, []),
        "CPLGetLastErrorMsg": (c_char_p, []),
        "CPLGetLastErrorType": (c_int, []),
        "GDALVersionInfo": (c_char_p, [c_char_p]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    lib.quiet_handler = ctypes.cast(lib.CPLQuietErrorHandler, c_void_p)
    # GDAL >= 3.7 has a signed 8-bit type (GDT_Int8) and warns once per band when asked for the old PIXELTYPE
    # marker ("PIXELTYPE=SIGNEDBYTE is no longer used"): ask only older GDALs.
    lib.legacy_signed_bytes = int(lib.GDALVersionInfo(b"VERSION_NUM") or 0) < 3070000
    return lib


def libgdal() -> Any | None:
    """rasterio's libgdal bound through ctypes, or ``None`` when it cannot be found (then rasterio reads)."""
    global _lib, _lib_loaded
    if _lib_loaded:
        return _lib
    with _lock:
        if not _lib_loaded:
            from rasterio.env import Env  # imports rasterio, which maps its libgdal into this process

            # Start rasterio's GDAL environment once (drivers, GDAL_DATA, PROJ search paths: process-wide
            # settings GeoTIFF georeferencing needs) before reading without it.
            with Env():
                pass
            path = _loaded_libgdal()
            lib = None
            if path is not None:
                try:
                    # RTLD_NOLOAD: bind the copy already in the process or fail, never load a second one.
                    lib = _bind(ctypes.CDLL(path, mode=os.RTLD_NOLOAD))
                except (OSError, AttributeError):
                    lib = None
            _lib, _lib_loaded = lib, True
    return _lib


def fastpath_enabled() -> bool:
    """Whether the fast path is on (``ENCDEC_GDAL_FASTPATH``, default on; ``0``/``false``/``no``/``off`` = off)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def handles(path: str) -> bool:
    """Whether ``path`` is a local file the fast path may open (URLs and GDAL virtual paths go to rasterio)."""
    return "://" not in path and not path.startswith("/vsi")


def _error(lib: Any, what: str) -> GdalError:
    msg = lib.CPLGetLastErrorMsg()
    text = msg.decode("utf-8", "replace") if msg else ""
    return GdalError(text or what)


@functools.lru_cache(maxsize=64)
def _crs_from_wkt(wkt: str) -> Any:
    from rasterio.crs import CRS

    return CRS.from_wkt(wkt)


_GEO_TAGS = (34735, 34736, 34737)  # GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams
_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}


def tiff_geokeys(path: str) -> bytes | None:
    """Raw bytes of the GeoKey tags of a TIFF's first IFD (byte order included), or ``None`` if not a TIFF.

    Raises:
        OSError, ValueError, struct.error: Unreadable or truncated file.
    """
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:2] not in (b"II", b"MM"):
            return None
        e = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(e + "H", head[2:4])[0]
        if version == 42:
            ifd, count_fmt, entry_fmt, inline = struct.unpack(e + "I", head[4:8])[0], "H", "HHII", 4
        elif version == 43:
            ifd, count_fmt, entry_fmt, inline = struct.unpack(e + "Q", head[8:16])[0], "Q", "HHQQ", 8
        else:
            return None
        f.seek(ifd)
        count_size = struct.calcsize(e + count_fmt)
        (n,) = struct.unpack(e + count_fmt, f.read(count_size))
        entry = struct.Struct(e + entry_fmt)
        table = f.read(n * entry.size)
        parts = [head[:2]]
        for i in range(n):
            tag, typ, cnt, value = entry.unpack_from(table, i * entry.size)
            if tag not in _GEO_TAGS:
                continue
            size = _TIFF_TYPE_SIZE.get(typ, 1) * cnt
            if size <= inline:
                raw = table[i * entry.size + entry.size - inline:][:size]
            else:
                f.seek(value)
                raw = f.read(size)
                if len(raw) != size:
                    raise ValueError(f"{path}: truncated GeoTIFF tag {tag}")
            parts.append(struct.pack(e + "HHQ", tag, typ, cnt) + raw)
        return b"" if len(parts) == 1 else b"".join(parts)


class GdalDataset:
    """One open raster, read-only, used by one thread. Make it with ``GdalDataset.open``."""

    def __init__(self, lib: Any, handle: int, path: str) -> None:
        self._lib, self.name = lib, path
        self._h: int | None = handle
        self.width = lib.GDALGetRasterXSize(handle)
        self.height = lib.GDALGetRasterYSize(handle)
        self.count = lib.GDALGetRasterCount(handle)
        bands = [lib.GDALGetRasterBand(handle, i + 1) for i in range(self.count)]
        if not all(bands):
            raise _error(lib, f"{path}: cannot get its bands")
        gdts = [lib.GDALGetRasterDataType(b) for b in bands]
        self.dtypes = tuple(_GDT_TO_NUMPY.get(t, "") for t in gdts)
        if 1 in gdts and getattr(lib, "legacy_signed_bytes", True) and any(lib.GDALGetMetadataItem(b, b"PIXELTYPE", b"IMAGE_STRUCTURE") == b"SIGNEDBYTE"
                             for b in bands):
            self.dtypes = ("",) * self.count  # legacy signed bytes (pre-Int8 GDAL): rasterio maps them itself
        self.descriptions = tuple((lib.GDALGetDescription(b) or b"").decode("utf-8", "replace") or None
                                  for b in bands)
        self.nodata: float | None = None
        if bands:
            has = ctypes.c_int(0)
            value = lib.GDALGetRasterNoDataValue(bands[0], ctypes.byref(has))
            self.nodata = float(value) if has.value else None
        gt = (ctypes.c_double * 6)()
        self.geotransform = tuple(gt) if lib.GDALGetGeoTransform(handle, gt) == 0 else (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        self._wkt: str | None = None
        self._geokeys: bytes | bool | None = False  # False: not looked up yet

    @classmethod
    def open(cls, path: str) -> GdalDataset | None:
        """Open ``path``; ``None`` when the fast path does not handle it (then open it with rasterio).

        Raises:
            GdalError: GDAL cannot open the file (its message says why).
        """
        if not (fastpath_enabled() and handles(path)):
            return None
        lib = libgdal()
        if lib is None:
            return None
        # GDAL's default handler prints each error to stderr; the reader reports bad tiles itself. The handler
        # stack and the last error are per thread in GDAL.
        lib.CPLPushErrorHandler(lib.quiet_handler)
        try:
            lib.CPLErrorReset()
            h = lib.GDALOpenEx(os.fsencode(path), _GDAL_OF_RASTER | _GDAL_OF_VERBOSE_ERROR, None, None, None)
            if not h:
                raise _error(lib, f"{path}: GDAL could not open it")
        finally:
            lib.CPLPopErrorHandler()
        try:
            ds = cls(lib, h, path)
        except BaseException:
            lib.GDALClose(h)
            raise
        if "" in ds.dtypes:  # a data type rasterio maps specially: let rasterio read this file
            ds.close()
            return None
        return ds

    @property
    def wkt(self) -> str:
        """Projection WKT (``GDALGetProjectionRef``), ``""`` without one; looked up on first use.

        Not cheap: for a GeoTIFF, GDAL builds the spatial reference from the GeoKeys through PROJ's database on
        this call (~0.5 ms for a UTM tile, 15x GDAL's whole open), so reads that need no CRS never ask.
        """
        if self._wkt is None:
            if self._h is not None:
                self._wkt = (self._lib.GDALGetProjectionRef(self._h) or b"").decode("utf-8", "replace")
            else:  # closed by the reader's LRU before anyone asked: open it again for this one look-up
                again = GdalDataset.open(self.name)
                if again is None:
                    raise GdalError(f"{self.name}: dataset is closed")
                try:
                    self._wkt = again.wkt
                finally:
                    again.close()
        return self._wkt

    def geokeys(self) -> bytes | None:
        """The file's raw GeoTIFF GeoKey tags (bytes; ``b""`` without any), or ``None`` when not a readable TIFF.

        Two files with byte-identical GeoKeys have the same CRS: a cheap equality test that needs no PROJ lookup.
        """
        if self._geokeys is False:
            try:
                self._geokeys = tiff_geokeys(self.name)
            except (OSError, ValueError, struct.error):
                self._geokeys = None
        return self._geokeys  # type: ignore[return-value]

    @property
    def crs(self) -> Any:
        """rasterio ``CRS`` built from the projection WKT (cached per WKT string), or ``None`` without one."""
        return _crs_from_wkt(self.wkt) if self.wkt else None

    @property
    def transform(self) -> Any:
        from affine import Affine

        return Affine.from_gdal(*self.geotransform)

    def read_into(self, indexes: Sequence[int], window: tuple[int, int, int, int], out: np.ndarray) -> None:
        """Read 1-based band ``indexes`` over ``window`` ``(row, col, h, w)`` into ``out`` ([len(indexes),h,w] or
        [h,w] for one band), a possibly strided numpy view, converting to ``out``'s dtype like rasterio does.

        Raises:
            GdalError: A block could not be read or decoded, or the window is outside the raster.
        """
        r, c, h, w = window
        if self._h is None:
            raise GdalError(f"{self.name}: dataset is closed")
        gdt = _NUMPY_TO_GDT.get(out.dtype.name)
        if gdt is None:
            raise GdalError(f"{self.name}: cannot read into a {out.dtype} buffer")
        view = out if out.ndim == 3 else out[None]
        if view.shape != (len(indexes), h, w):
            raise GdalError(f"{self.name}: buffer {out.shape} does not match {len(indexes)} bands x {h}x{w}")
        band_map = (ctypes.c_int * len(indexes))(*indexes)
        lib = self._lib
        lib.CPLPushErrorHandler(lib.quiet_handler)
        try:
            lib.CPLErrorReset()
            err = lib.GDALDatasetRasterIOEx(self._h, _GF_READ, c, r, w, h, view.ctypes.data, w, h, gdt,
                                            len(indexes), band_map, view.strides[2], view.strides[1],
                                            view.strides[0], None)
            if err != 0:
                raise _error(lib, f"{self.name}: read failed")
        finally:
            lib.CPLPopErrorHandler()

    def close(self) -> None:
        if self._h is not None:
            h, self._h = self._h, None
            self._lib.GDALClose(h)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: ctypes/GDAL may already be gone; the OS reclaims the handle
            pass
