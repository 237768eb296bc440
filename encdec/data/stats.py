"""``encdec-launch stats``: per-band means/stds and class frequencies over a sample of tiles, in recipe form.

Exact streaming sums (float64 sum and sum of squares per band, nodata excluded) over a seeded random sample of
tiles, each read whole-band with rasterio; class counts from the paired masks (nodata/-1 excluded), where there
are masks: a folder of images alone gives the image statistics. Folders are searched recursively, so the root
``make-data`` wrote (``train/``, ``val/``) works as well as one split. Errors name the command's own flags
(``--bands``, ``--image-suffix``), never recipe keys: the user has not written a recipe yet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encdec.data.readers import is_nodata, resolve_bands, typed_nodata
from encdec.data.sources import Sample, expand

IMAGE_EXTENSIONS = (".tif", ".tiff")
MAKE_DATA_SUFFIX = "_img.tif"  # what make-data writes: preferred when present, so its masks are not images


class StatsError(ValueError):
    """The input of ``stats`` cannot be used; the message names the flag to change."""


@dataclass
class BandStats:
    """Running sums for per-band statistics and class counts."""

    bands: Sequence[int | str]
    count: np.ndarray = field(init=False)
    total: np.ndarray = field(init=False)
    total_sq: np.ndarray = field(init=False)
    classes: dict[int, int] = field(default_factory=dict)
    tiles: int = 0
    skipped: list[str] = field(default_factory=list)
    mask_mismatch: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.bands)
        self.count = np.zeros(n, np.float64)
        self.total = np.zeros(n, np.float64)
        self.total_sq = np.zeros(n, np.float64)

    def add(self, sample: Sample) -> None:
        """Add one sample (its first frame file, all bands selected; mask classes when paired)."""
        import rasterio

        try:
            with rasterio.open(sample.images[0]) as ds:
                idx = resolve_bands(self.bands, ds.descriptions, ds.count, sample.images[0])
                px = ds.read(list(idx))
                nodata = typed_nodata(px.dtype, ds.nodata)
            valid = ~is_nodata(px, nodata).any(axis=0) if nodata is not None else np.ones(px.shape[1:], bool)
            vals = px[:, valid].astype(np.float64)
            self.count += vals.shape[1]
            self.total += vals.sum(axis=1)
            self.total_sq += (vals**2).sum(axis=1)
            if sample.mask is not None:
                with rasterio.open(sample.mask) as ms:
                    differs = _grid_difference(ds, ms)
                    m = ms.read(1)
                    mnodata = typed_nodata(m.dtype, ms.nodata)
                if differs:  # training rejects this pair; its image still counts here
                    self.mask_mismatch.append(f"{sample.mask}: {differs}")
                    self.tiles += 1
                    return
                keep = valid & (m >= 0) if m.dtype.kind in "iu" else valid & np.isfinite(m)
                if mnodata is not None:
                    keep &= ~is_nodata(m, mnodata)
                if m.dtype.kind in "iu":
                    values, counts = np.unique(m[keep], return_counts=True)
                    for v, c in zip(values.tolist(), counts.tolist()):
                        self.classes[int(v)] = self.classes.get(int(v), 0) + int(c)
            self.tiles += 1
        except Exception as e:  # a bad tile is reported, not fatal (as in training)
            self.skipped.append(f"{sample.key}: {type(e).__name__}: {e}")

    @property
    def means(self) -> list[float]:
        """Per-band means."""
        return (self.total / np.maximum(self.count, 1)).tolist()

    @property
    def stds(self) -> list[float]:
        """Per-band population standard deviations."""
        mean = self.total / np.maximum(self.count, 1)
        var = np.maximum(self.total_sq / np.maximum(self.count, 1) - mean**2, 0.0)
        return np.sqrt(var).tolist()

    def class_frequencies(self) -> dict[int, float]:
        """Fraction of labelled pixels per class."""
        n = sum(self.classes.values())
        return {k: v / n for k, v in sorted(self.classes.items())} if n else {}

    def recipe(self) -> dict[str, Any]:
        """The result as recipe sections (``data.bands/means/stds``; class weights for ``loss``)."""
        out: dict[str, Any] = {"data": {"bands": list(self.bands), "means": [round(m, 2) for m in self.means],
                                        "stds": [round(s, 2) for s in self.stds]}}
        freq = self.class_frequencies()
        if freq:
            # Inverse-frequency weights normalised to mean 1: a starting point for loss.class_weights.
            n = max(freq) + 1
            inv = [1.0 / freq[c] if freq.get(c) else 0.0 for c in range(n)]
            scale = sum(w > 0 for w in inv) / sum(inv)
            out["loss"] = {"class_weights": [round(w * scale, 4) for w in inv]}
            out["class_frequencies"] = {int(k): round(v, 6) for k, v in freq.items()}
        return out


def _grid_difference(image: Any, mask: Any) -> str:
    """How a mask's grid differs from its image's (size, CRS), or '' when it matches."""
    out = []
    if (mask.width, mask.height) != (image.width, image.height):
        out.append(f"size {mask.width}x{mask.height} vs image {image.width}x{image.height}")
    if mask.crs != image.crs:
        out.append(f"CRS {mask.crs} vs image {image.crs}")
    return ", ".join(out)


def find_samples(tiles: str, image_suffix: str | None, mask_suffix: str | None) -> list[Sample]:
    """Images under ``tiles`` (a folder, searched recursively; a glob; one file), each with its mask when present.

    Args:
        tiles: The TILES argument.
        image_suffix: ``--image-suffix``; None: ``_img.tif`` when such files exist (make-data), else every
            ``.tif``/``.tiff`` that is not a mask.
        mask_suffix: ``--mask-suffix``: a mask is ``<stem><mask_suffix>`` beside its image; missing is fine.

    Raises:
        StatsError: nothing there, or no file ends in the image suffix.
    """
    if os.path.isdir(tiles):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(tiles) for f in names)
    else:
        files = expand(tiles)
    if not files:
        raise StatsError(f"TILES={tiles!r} matches no files. Fix: give a folder, a glob or a file that exists")
    if image_suffix is None:
        ends = (MAKE_DATA_SUFFIX,) if any(f.endswith(MAKE_DATA_SUFFIX) for f in files) else IMAGE_EXTENSIONS
    else:
        ends = (image_suffix,)
    samples = []
    for path in files:
        end = next((e for e in ends if path.lower().endswith(e.lower())), None)
        if end is None or (mask_suffix and path.endswith(mask_suffix)):
            continue
        mask = path[: -len(end)] + mask_suffix if mask_suffix else None
        samples.append(Sample(images=(path,), mask=mask if mask and os.path.isfile(mask) else None))
    if not samples:
        seen = sorted({os.path.splitext(f)[1] or os.path.basename(f) for f in files})[:5]
        raise StatsError(f"TILES={tiles!r}: none of its {len(files)} files ends in {' or '.join(ends)!r} (endings "
                         f"there: {', '.join(seen)}). Fix: give --image-suffix with your images' ending")
    return samples


def _band_names(descriptions: Sequence[str | None]) -> list[str] | None:
    """The file's band names, one band group when frames are stacked as repeated groups; None when unnamed."""
    if not descriptions or not all(descriptions):
        return None
    names = [str(d) for d in descriptions]
    unique = list(dict.fromkeys(n.upper() for n in names))
    if len(unique) < len(names) and len(names) % len(unique) == 0:
        return names[: len(unique)]
    return names if len(unique) == len(names) else None


def choose_bands(samples: Sequence[Sample], requested: Sequence[int | str] | None,
                 flag: str = "--bands") -> tuple[list[int | str], str]:
    """The bands to compute over, checked against the first readable file: ``requested`` (``--bands``), else all
    the file's bands, by name when every band has one, by 0-based index otherwise. Returns (bands, that file).

    Raises:
        StatsError: a requested band is not in the file (naming ``--bands``), or no file opens.
    """
    import rasterio

    errors = []
    for sample in samples:
        path = sample.images[0]
        try:
            with rasterio.open(path) as ds:
                descriptions, count = ds.descriptions, ds.count
        except Exception as e:  # unreadable: the next file decides, this one is reported as skipped
            errors.append(f"{path}: {e}")
            continue
        names = _band_names(descriptions)
        if requested is None:
            return (list(names) if names else list(range(count))), path
        have = [d for d in descriptions if d]
        for b in requested:
            if isinstance(b, int) and b >= count:
                raise StatsError(f"{flag}: band index {b}, but {path} has {count} bands (indexes 0..{count - 1}). "
                                 f"Fix: give indexes below {count}, or leave {flag} out for all of them")
            if isinstance(b, str) and b.strip().upper() not in {h.strip().upper() for h in have}:
                raise StatsError(f"{flag}: band {b!r} is not named in {path} (its band names: "
                                 f"{', '.join(have) if have else 'none'}). Fix: give 0-based indexes (e.g. "
                                 f"{flag} {','.join(str(i) for i in range(min(count, 3)))}) or names from that "
                                 f"list, or leave {flag} out for all {count} bands")
        resolve_bands(list(requested), descriptions, count, path)
        return list(requested), path
    raise StatsError(f"none of the {len(samples)} files opens; first: {'; '.join(errors[:3])}")


def sample_tiles(samples: Sequence[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
    """A seeded random subset of at most ``limit`` samples (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    idx = np.random.default_rng(seed).choice(len(samples), size=limit, replace=False)
    return [samples[i] for i in sorted(idx.tolist())]


def compute(samples: Sequence[Sample], bands: Sequence[int | str], *, progress: bool = True) -> BandStats:
    """Accumulate statistics over ``samples`` (with a rich progress bar when ``progress``)."""
    stats = BandStats(bands)
    if not progress:
        for s in samples:
            stats.add(s)
        return stats
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("stats"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("tiles", total=len(samples))
        for s in samples:
            stats.add(s)
            bar.advance(task)
    return stats
