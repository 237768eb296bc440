"""Augmentations decided per sample from ``(seed, epoch, sample_id)`` and applied as array views.

The draw depends only on the sample and the epoch, never on the rank, the world size or the read order, so a run
resumed at another world size sees the same augmented pixels. Flips and rot90 are views on the raw read, so the
normaliser's single pass writes the augmented result (no extra copy). A random crop is a choice of read window:
only the cropped pixels are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from encdec.config import AugmentSection as AugmentSpec


@dataclass(frozen=True)
class AugmentParams:
    """What to do to one sample. ``crop`` is the (row, col) offset fraction in [0, 1) of the read window."""

    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    crop: tuple[float, float] = (0.5, 0.5)


NO_AUGMENT = AugmentParams()


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """The generator for one sample in one epoch (independent of rank and order)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, sample_id, 0xA06])


def draw(spec: AugmentSpec, seed: int, epoch: int, sample_id: int) -> AugmentParams:
    """Draw the augmentation for a sample; ``NO_AUGMENT`` (centre crop) when nothing is on."""
    if not spec.any:
        return NO_AUGMENT
    u = sample_rng(seed, epoch, sample_id).random(5)
    return AugmentParams(
        hflip=spec.hflip and bool(u[0] < 0.5),
        vflip=spec.vflip and bool(u[1] < 0.5),
        rot90=int(u[2] * 4) if spec.rot90 else 0,
        crop=(float(u[3]), float(u[4])) if spec.random_crop else (0.5, 0.5),
    )


def crop_offset(size: int, target: int, frac: float) -> int:
    """Offset of a ``target``-long crop inside ``size`` at fraction ``frac`` (0.5 is the centre crop)."""
    slack = size - target
    return min(slack, int(frac * (slack + 1))) if slack > 0 else 0


def apply(x: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Apply flips/rot90 to the last two axes of ``x`` as a view (image [C,(T),H,W] or mask [H,W])."""
    if params.hflip:
        x = x[..., :, ::-1]
    if params.vflip:
        x = x[..., ::-1, :]
    if params.rot90:
        x = np.rot90(x, k=params.rot90, axes=(-2, -1))
    return x
