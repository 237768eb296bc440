"""Band lists of the Prithvi backbones: parsing what users pass (``bands=[...]``) and mapping a checkpoint's
patch-embedding channels onto the model's bands.

Bands are given as HLS names (``"RED"``, any case, or an enum whose ``.value``/``.name`` is one), as ints (an
arbitrary id: a band the checkpoint does not know), as other strings (likewise new), or as an inclusive interval
``(first, last)`` of ints, as TerraTorch accepts. A band present in the pretrained list gets its pretrained
weights; any other band gets freshly initialised ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

from encdec.config import HLS_BANDS

__all__ = ["DEFAULT_BANDS", "HLS_BAND_NAMES", "Band", "band_label", "normalize_bands"]

#: every HLS band name (Sentinel-2 + Landsat), the names a band list may use
HLS_BAND_NAMES: tuple[str, ...] = (
    "COASTAL_AEROSOL",
    "BLUE",
    "GREEN",
    "RED",
    "RED_EDGE_1",
    "RED_EDGE_2",
    "RED_EDGE_3",
    "NIR_BROAD",
    "NIR_NARROW",
    "SWIR_1",
    "SWIR_2",
    "WATER_VAPOR",
    "CIRRUS",
    "THERMAL_INFRARED_1",
    "THERMAL_INFRARED_2",
)

#: The six HLS bands every Prithvi-EO-2.0 checkpoint was pretrained on, in channel order.
DEFAULT_BANDS: tuple[str, ...] = HLS_BANDS

Band = str | int


def _one(band: Any, field: str, index: int) -> Band:
    if isinstance(band, Enum):  # TerraTorch's HLSBands.RED and friends
        band = band.value if isinstance(band.value, (str, int)) else band.name
    if isinstance(band, bool):
        raise ValueError(f"{field}[{index}] = {band!r}: a band is an HLS name, an int id or an (first, last) interval")
    if isinstance(band, int):
        return band
    if isinstance(band, str):
        name = band.strip()
        if not name:
            raise ValueError(f"{field}[{index}] is an empty string; give an HLS band name such as 'RED' or an int id")
        upper = name.upper()
        return upper if upper in HLS_BAND_NAMES else name
    raise ValueError(
        f"{field}[{index}] = {band!r} ({type(band).__name__}) is not a band; use an HLS name "
        f"({', '.join(DEFAULT_BANDS)}, ...), an int id or an inclusive (first, last) interval of ints"
    )


def normalize_bands(bands: Sequence[Any] | None, field: str = "bands") -> list[Band]:
    """Canonical band list: HLS names upper-cased, ints kept, ``(a, b)`` intervals expanded (inclusive).

    Args:
        bands: what the user passed; ``None`` means the pretrained default.
        field: the argument's name, for error messages.

    Raises:
        ValueError: empty list, an element that is not a band, a malformed interval, or a band given twice.
    """
    if bands is None:
        return list(DEFAULT_BANDS)
    if isinstance(bands, (str, bytes)) or not isinstance(bands, Sequence):
        raise ValueError(f"{field} must be a list of bands, got {bands!r}; e.g. {field}=['BLUE', 'GREEN', 'RED']")
    out: list[Band] = []
    for i, band in enumerate(bands):
        if isinstance(band, (tuple, list)):
            if len(band) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in band):
                raise ValueError(
                    f"{field}[{i}] = {band!r}: an interval must be two ints (first, last), inclusive"
                )
            first, last = band
            if last < first:
                raise ValueError(f"{field}[{i}] = {band!r}: interval end {last} is before its start {first}")
            out.extend(range(first, last + 1))
        else:
            out.append(_one(band, field, i))
    if not out:
        raise ValueError(f"{field} is empty; give at least one band (default: {list(DEFAULT_BANDS)})")
    seen: set[Band] = set()
    dups = [b for b in out if b in seen or seen.add(b)]  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"{field} lists {sorted(set(map(str, dups)))} more than once; each band may appear once")
    return out


def band_label(band: Band) -> str:
    """Printable name of a band for messages."""
    return band if isinstance(band, str) else f"#{band}"
