"""Reading one micro-batch (a list of ``(epoch, sample_id)``) into numpy arrays, shared by both feeds.

Slots whose sample is padding or a bad tile are filled with an "ignore" sample (image zeros, target -1 / NaN,
sample id -1), so every rank's micro-batch keeps its exact shape and the loss ignores the slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from encdec.config import AugmentSection as AugmentSpec
from encdec.data import augment as aug
from encdec.data.badtiles import REASONS, BadTileError, BadTileTracker
from encdec.data.plan import PAD
from encdec.data.readers import TileReader
from encdec.data.sources import Sample


@dataclass(frozen=True)
class BatchLayout:
    """Shapes and dtypes of a micro-batch, fixed for the whole run."""

    size: int
    channels: int
    img_size: int
    num_frames: int
    target: str
    label_dtype: str = "int64"
    temporal: bool = False
    location: bool = False

    def allocate(self, size: int | None = None) -> dict[str, np.ndarray]:
        """Fresh arrays for one micro-batch of ``size`` rows (default: the micro-batch), handed to torch as is."""
        b, c, s, t = size or self.size, self.channels, self.img_size, self.num_frames
        out: dict[str, np.ndarray] = {
            "image": np.empty((b, c, t, s, s) if t > 1 else (b, c, s, s), dtype=np.float32),
            "sample_id": np.full((b,), PAD, dtype=np.int64),
        }
        if self.target == "mask":
            out["mask"] = np.empty((b, s, s), dtype=np.int64)
        elif self.target == "regression":
            out["mask"] = np.empty((b, s, s), dtype=np.float32)
        elif self.target == "label":
            out["label"] = np.empty((b,), dtype=self.label_dtype)
        if self.temporal:
            out["temporal_coords"] = np.zeros((b, t, 2), dtype=np.float32)
        if self.location:
            out["location_coords"] = np.zeros((b, 2), dtype=np.float32)
        return out

    def fill_ignore(self, arrays: dict[str, np.ndarray], i: int) -> None:
        """Make slot ``i`` an ignored sample."""
        arrays["image"][i] = 0.0
        arrays["sample_id"][i] = PAD
        if "mask" in arrays:
            arrays["mask"][i] = -1 if self.target == "mask" else np.nan
        if "label" in arrays:
            arrays["label"][i] = -1


class SampleLoader:
    """Reads one slot: skips known-bad samples, turns ``BadTileError`` into an ignored slot and a count.

    Args:
        samples: The split's samples (index = sample id).
        reader: The tile reader.
        layout: Batch layout.
        augment: Augmentations (``None`` on val).
        seed: Seed for the per-sample augmentation draw.
        tracker: Bad-tile counter of this rank.
    """

    def __init__(self, samples: Sequence[Sample], reader: TileReader, layout: BatchLayout,
                 augment: AugmentSpec | None, seed: int, tracker: BadTileTracker) -> None:
        self.samples = samples
        self.reader = reader
        self.layout = layout
        self.augment = augment
        self.seed = seed
        self.tracker = tracker

    def read_into(self, arrays: dict[str, np.ndarray], i: int, epoch: int, sample_id: int) -> BadTileError | None:
        """Read sample ``sample_id`` (in ``epoch``) into slot ``i``; a bad sample leaves an ignored slot.

        Returns:
            The ``BadTileError`` when the sample is bad (not yet counted), else ``None``.
        """
        if sample_id == PAD:
            self.layout.fill_ignore(arrays, i)
            return None
        sample = self.samples[sample_id]
        if self.tracker.is_known_bad(sample.key):
            self.layout.fill_ignore(arrays, i)
            return None
        params = aug.draw(self.augment, self.seed, epoch, sample_id) if self.augment else aug.NO_AUGMENT
        target = arrays["mask"][i] if "mask" in arrays else None
        try:
            result = self.reader.read(sample, arrays["image"][i], target, params)
        except BadTileError as e:
            self.layout.fill_ignore(arrays, i)
            return e
        arrays["sample_id"][i] = sample_id
        if "label" in arrays:
            arrays["label"][i] = sample.label if sample.label is not None else -1
        if "temporal_coords" in arrays and sample.times is not None:
            arrays["temporal_coords"][i] = np.asarray(sample.times, dtype=np.float32)
        if "location_coords" in arrays and result.location is not None:
            arrays["location_coords"][i] = result.location
        return None

    def load(self, arrays: dict[str, np.ndarray], i: int, epoch: int, sample_id: int, step: int | None = None) -> None:
        """``read_into`` and count a bad sample (raising past the ``max_bad_fraction`` ceiling); ``step`` is the
        optimizer step the batch is for (written into ``skipped_tiles.csv``)."""
        error = self.read_into(arrays, i, epoch, sample_id)
        if error is not None:
            self.tracker.record(self.samples[sample_id].key, error, step)


def read_batch(loader: SampleLoader, epochs: np.ndarray, ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read a micro-batch serially (the Ray feed's ``map_batches`` body), without counting bad samples.

    Returns:
        The batch arrays and, per row, 0 for a good or padding slot or ``1 + REASONS.index(reason)`` for a bad one.
    """
    arrays = loader.layout.allocate(len(ids))
    bad = np.zeros(len(ids), dtype=np.int8)
    for i, (e, sid) in enumerate(zip(epochs.tolist(), ids.tolist())):
        error = loader.read_into(arrays, i, int(e), int(sid))
        if error is not None:
            bad[i] = 1 + REASONS.index(error.reason)
    return arrays, bad


def to_torch(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Numpy batch -> torch tensors without copying."""
    import torch

    return {k: torch.from_numpy(v) for k, v in arrays.items()}
