"""From a file's pixels to the model's input: the one definition that training and prediction share.

Band selection by name (``data.bands`` among the file's band descriptions, or among ``data.dataset_bands``),
``constant_scale``, ``(x - mean) / std`` and nodata (``no_data_replace``) are ``resolve_bands`` and ``Normalizer``;
the training reader (``readers.TileReader``) applies them to windowed reads straight into its batch slots, and
``preprocess`` applies the same two to an array read whole (a predict command, a check). Their order and meaning
follow TerraTorch 1.2's ``GenericPixelWiseDataset`` + ``Normalize``: nodata replaced, then scaled, then normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from encdec.config import DataSection
from encdec.data.normalize import Normalizer
from encdec.data.readers import mark_nodata, resolve_bands, typed_nodata

__all__ = ["make_normalizer", "preprocess"]


def make_normalizer(spec: DataSection) -> Normalizer:
    """The normaliser of a recipe's ``data:`` section (statistics, ``constant_scale``, ``no_data_replace``)."""
    means, stds = spec.stats()  # the recipe's, else the Prithvi HLS statistics for the HLS bands
    return Normalizer(means, stds, constant_scale=spec.constant_scale, no_data_replace=spec.no_data_replace)


def preprocess(pixels: np.ndarray, spec: DataSection, *, descriptions: Sequence[str | None] = (),
               nodata: float | None = None, path: str = "<array>") -> tuple[np.ndarray, np.ndarray]:
    """One image, as its file holds it, to the model's input.

    Args:
        pixels: ``[count, H, W]`` in the file's dtype; ``data.num_frames`` frames are consecutive band groups.
        spec: The parsed ``data:`` section.
        descriptions: The file's band descriptions (used when ``data.dataset_bands`` is not set).
        nodata: The file's nodata value.
        path: The file, for messages.

    Returns:
        The input ``[C, H, W]`` (``[C, T, H, W]`` when ``num_frames > 1``, float32) and the valid-pixel mask
        ``[H, W]`` (False where any selected band of any frame is nodata).

    Raises:
        BadTileError: A band is missing or the band count does not split into frames.
    """
    t = spec.num_frames
    count = pixels.shape[0]
    if count % t:
        from encdec.data.badtiles import BadTileError

        raise BadTileError(path, "band-count", f"{count} bands do not split into data.num_frames={t} frames")
    per = count // t
    idx = resolve_bands(spec.bands, list(descriptions)[:per] or [None] * per, per, path, spec.dataset_bands)
    raw = np.stack([pixels[[i - 1 + f * per for i in idx]] for f in range(t)])  # [T, C, H, W]
    value = typed_nodata(raw.dtype, nodata)
    invalid = np.zeros(raw.shape[-2:], dtype=bool)
    if value is not None:
        for frame in raw:
            mark_nodata(frame, value, invalid, np.empty_like(invalid))
    view = raw.transpose(1, 0, 2, 3) if t > 1 else raw[0]
    out = np.empty(view.shape, dtype=np.float32)
    make_normalizer(spec)(view, out, invalid if invalid.any() else None, nodata=value)
    return out, ~invalid
