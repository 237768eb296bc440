"""Checks of the ``data:`` section on the driver, before any cluster starts (``--dry-run`` and every launch).

Every split's source must exist and list at least one sample (a misspelt path fails in a second here, not in a
Ray traceback minutes later), and a few samples of each split, spread over its list, are read exactly as training
reads them: bands present, dtype, mask size/CRS against the image, nodata fraction. What training would skip is
reported as a warning, naming the files; a split none of whose sampled tiles can be read is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encdec.config import DataSection
from encdec.data.badtiles import BadTileError, EmptyTileError
from encdec.data.config import DataConfigError
from encdec.data.sources import list_samples

SAMPLE = 8  # tiles read per split: enough to catch a wrong band list or mask layout, a second or two


@dataclass
class PreflightReport:
    """What the check found: samples per split, what training would skip, and errors that stop the launch."""

    samples: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)


def _spread(n: int, k: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, k))}) if n else []


def preflight(spec: DataSection, *, skip: Iterable[str] = (), sample: int = SAMPLE) -> PreflightReport:
    """Check the ``data:`` section's sources and read a sample of each split's tiles.

    Args:
        spec: The recipe's ``data:`` section.
        skip: Splits not to check (e.g. synthetic tiles the launcher writes just before the run).
        sample: Tiles read per split.

    Returns:
        The report; ``errors`` non-empty means the run cannot work.
    """
    from encdec.data.build import make_reader  # build imports the feeds; keep this module's import light

    report = PreflightReport()
    skipped = set(skip)
    for split in ("train", "val", "test"):
        source = spec.split(split)
        if source is None or split in skipped:
            continue
        where = f"data.{split}"
        try:
            samples = list_samples(source, img_size=spec.img_size, where=where, split=split)
        except DataConfigError as e:
            report.errors.append(str(e))
            continue
        report.samples[split] = len(samples)
        reader = make_reader(spec)
        bad: list[BadTileError] = []
        empty: list[BadTileError] = []
        nodata: list[float] = []
        dtypes: set[str] = set()
        picked = _spread(len(samples), sample)
        c, s, t = len(spec.bands), spec.img_size, spec.num_frames
        image = np.empty((c, t, s, s) if t > 1 else (c, s, s), dtype=np.float32)
        for i in picked:
            smp = samples[i]
            try:
                reader.target = reader.probe_target(smp)
                target = None if reader.target in ("none", "label") else np.empty(
                    (s, s), dtype=np.float32 if reader.target == "regression" else np.int64)
                result = reader.read(smp, image, target)
                dtypes.add(str(reader.files.get(smp.images[0]).dtypes[0]))
                nodata.append(1.0 - result.valid_fraction)
            except EmptyTileError as e:
                empty.append(e)
            except BadTileError as e:
                bad.append(e)
        reader.close()
        report.details[split] = {"read": len(picked), "bad": len(bad), "empty": len(empty), "dtypes": sorted(dtypes),
                                 "nodata_fraction": float(np.mean(nodata)) if nodata else None}
        if bad and len(bad) == len(picked):
            report.errors.append(
                f"{where}: none of the {len(picked)} sampled tiles can be used: "
                + "; ".join(str(e) for e in bad[:3]) + ". Fix: check data.bands / data.dataset_bands, "
                f"data.img_size and the mask pairing ({where}).")
        elif bad:
            report.warnings.append(
                f"{where}: {len(bad)} of {len(picked)} sampled tiles would be skipped as bad (counted against "
                f"data.max_bad_fraction={spec.max_bad_fraction}): " + "; ".join(str(e) for e in bad[:3]))
        if empty:
            report.warnings.append(
                f"{where}: {len(empty)} of {len(picked)} sampled tiles would be skipped as empty (not counted as "
                f"bad): " + "; ".join(str(e) for e in empty[:3]))
    return report
