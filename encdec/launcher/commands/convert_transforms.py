"""``convert-terratorch`` for a data module's albumentations transforms: ours where one exists, else listed.

TerraTorch applies ``train_transform`` / ``val_transform`` / ``test_transform`` (lists of ``class_path`` entries)
to each sample before normalising. Ours are ``data.augment`` (training only; each flip with p=0.5, rot90 uniform
over the four turns, a random ``img_size`` read window), and validation/test read every sample unaugmented. So:

- ``ToTensorV2`` and TerraTorch's ``FlattenTemporalIntoChannels`` / ``UnflattenTemporalFromChannels`` only change
  the array layout: mapped (nothing to do);
- training ``HorizontalFlip`` / ``VerticalFlip`` (p=0.5), ``D4`` (p=1: uniform over the eight symmetries = hflip x
  rot90), ``RandomRotate90`` (p=1), ``Flip`` and ``RandomCrop`` (square) map to ``hflip`` / ``vflip`` / ``rot90`` /
  ``random_crop`` + ``img_size``; where the draw's probabilities differ from ours the note says so;
- everything else that changes pixels (``Resize``, ``Normalize``, colour/noise transforms, any random transform on
  validation or test) is ``unmapped``: the conversion refuses it unless ``--allow-unmapped``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["convert_transforms"]

LAYOUT_ONLY = {"ToTensorV2", "FlattenTemporalIntoChannels", "UnflattenTemporalFromChannels"}
SPLITS = {"train_transform": "train", "val_transform": "val", "test_transform": "test"}
# albumentations 2 (TerraTorch 1.2.11 installs 2.0.8) defaults; the flips' and Flip's are 0.5
DEFAULT_P = {"D4": 1.0, "RandomRotate90": 1.0}


def _entry(item: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(item, Mapping):
        return str(item.get("class_path", "")).rsplit(".", 1)[-1], dict(item.get("init_args") or {})
    return str(item).rsplit(".", 1)[-1], {}


def _train_one(name: str, kw: dict[str, Any], augment: dict[str, Any], where: str,
               notes: list[str], unmapped: list[str]) -> int | None:
    """Map one training transform into ``augment``; returns a crop size when it sets ``img_size``."""
    p = float(kw.get("p", DEFAULT_P.get(name, 0.5)))
    if name in ("HorizontalFlip", "VerticalFlip"):
        if p != 0.5:
            unmapped.append(f"{where} {name}(p={p}): our flips have p=0.5")
        else:
            augment["hflip" if name == "HorizontalFlip" else "vflip"] = True
    elif name == "D4":
        if p != 1.0:
            unmapped.append(f"{where} D4(p={p}): ours (hflip + rot90) draws one of the eight symmetries always")
        else:
            augment.update(hflip=True, rot90=True)
    elif name == "RandomRotate90":
        augment["rot90"] = True
        if p != 1.0:
            notes.append(f"{where} RandomRotate90(p={p}) -> data.augment.rot90 (a uniform quarter turn, unrotated "
                         f"1/4 of the time instead of {1 - p + p / 4:.3g})")
    elif name == "Flip":
        augment.update(hflip=True, vflip=True)
        notes.append(f"{where} Flip(p={p}) -> data.augment.hflip + vflip (each p=0.5: unflipped 1/4 of the time "
                     f"instead of {1 - p:.3g}); albumentations 2 (TerraTorch 1.2.11) has no Flip: TerraTorch itself "
                     "refuses this config there")
    elif name == "RandomCrop":
        h, w = kw.get("height"), kw.get("width")
        if h is None or h != w:
            unmapped.append(f"{where} RandomCrop(height={h}, width={w}): only square crops map (data.img_size)")
        else:
            augment["random_crop"] = True
            return int(h)
    else:
        unmapped.append(f"{where} {name}{'(' + ', '.join(f'{k}={v}' for k, v in kw.items()) + ')' if kw else ''}: "
                        f"changes the pixels and has no equivalent in data.augment")
    return None


def convert_transforms(args: dict[str, Any]) -> tuple[dict[str, Any], int | None, list[str], list[str]]:
    """Pop the ``*_transform`` keys of a data module's ``init_args`` and map them.

    Args:
        args: The data module's remaining ``init_args`` (the transform keys are removed from it).

    Returns:
        ``(augment, crop, notes, unmapped)``: our ``data.augment`` keys, the ``img_size`` a square ``RandomCrop``
        sets (None: no crop), what maps with a difference worth knowing, and what changes the samples or their
        values and cannot be mapped.
    """
    augment: dict[str, Any] = {}
    crop: int | None = None
    notes: list[str] = []
    unmapped: list[str] = []
    for key, split in SPLITS.items():
        items = args.pop(key, None) or []
        if not isinstance(items, list):
            unmapped.append(f"data.init_args.{key}: a {type(items).__name__}, not a list of transforms")
            continue
        for i, item in enumerate(items):
            name, kw = _entry(item)
            where = f"data.init_args.{key}[{i}]"
            if name in LAYOUT_ONLY:
                continue
            if name == "Resize":
                unmapped.append(f"{where} Resize(height={kw.get('height')}, width={kw.get('width')}): resampling has "
                                "no equivalent (the reader reads the files at their own resolution, in data.img_size "
                                "windows); resample the files, or drop the Resize")
                continue
            if split == "train":
                crop = _train_one(name, kw, augment, where, notes, unmapped) or crop
            else:  # validation and test read every sample as it is; a random or resampling transform differs
                unmapped.append(f"{where} {name}: {split} samples are read unaugmented and unresampled here")
    if args.pop("predict_transform", None):
        notes.append("data.init_args.predict_transform: not used by training (predict reads the recipe's data)")
    return augment, crop, notes, unmapped
