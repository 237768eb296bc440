"""``encdec-launch stats``: per-band means/stds and class frequencies over a sample of tiles, in recipe form.

Exact streaming sums (float64 sum and sum of squares per band, nodata excluded) over a seeded random sample of
tiles, each read whole-band with rasterio; class counts from the paired masks (nodata/-1 excluded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encdec.data.readers import is_nodata, resolve_bands, typed_nodata
from encdec.data.sources import Sample


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
                    m = ms.read(1)
                    mnodata = typed_nodata(m.dtype, ms.nodata)
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
