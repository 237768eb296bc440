"""``convert-terratorch`` for the data module: its layout, bands and pixel settings as our ``data:`` section.

TerraTorch's ``GenericNonGeoSegmentationDataModule`` (and the pixel-wise regression one) maps key for key onto
``encdec.config.data_layout``: ``<split>_data_root`` / ``<split>_label_data_root`` / ``img_grep`` / ``label_grep``
/ ``<split>_split`` -> ``data.<split>.image_root`` / ``label_root`` / ``image_glob`` / ``label_glob`` /
``split_file``; ``dataset_bands`` -> ``data.dataset_bands`` and ``output_bands`` -> ``data.bands``;
``constant_scale``, ``no_data_replace``, ``no_label_replace`` unchanged. ``Sen1Floods11NonGeoDataModule`` is that
layout with fixed folders, globs, split files, bands and statistics (copied from TerraTorch 1.2.11's
``terratorch/datamodules/sen1floods11.py``, Apache-2.0). What would change the samples or their values and has no
equivalent is returned as ``unmapped`` so the conversion can refuse it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["convert_layout"]

SEN1FLOODS11_BANDS = ["COASTAL_AEROSOL", "BLUE", "GREEN", "RED", "RED_EDGE_1", "RED_EDGE_2", "RED_EDGE_3",
                      "NIR_BROAD", "NIR_NARROW", "WATER_VAPOR", "CIRRUS", "SWIR_1", "SWIR_2"]
SEN1FLOODS11_DIRS = ("v1.1/data/flood_events/HandLabeled/S2Hand", "v1.1/data/flood_events/HandLabeled/LabelHand",
                     "v1.1/splits/flood_handlabeled")  # images, labels, split files
SEN1FLOODS11_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # split -> flood_<name>_data.txt
SEN1FLOODS11_GLOBS = ("*_S2Hand.tif", "*_LabelHand.tif")
SEN1FLOODS11_MEANS = dict(zip(SEN1FLOODS11_BANDS, [
    0.16450718, 0.1412956, 0.13795798, 0.12353792, 0.1481099, 0.23991728, 0.28587557, 0.26345379, 0.30902815,
    0.04911151, 0.00652506, 0.2044958, 0.11912015], strict=True))
SEN1FLOODS11_STDS = dict(zip(SEN1FLOODS11_BANDS, [
    0.06977374, 0.07406382, 0.07370365, 0.08692279, 0.07778555, 0.09105416, 0.10690993, 0.10096586, 0.11798815,
    0.03380113, 0.01463465, 0.09772074, 0.07659938], strict=True))
# Generic data-module keys that change which samples are read or their values, and have no equivalent here.
UNMAPPABLE = ("reduce_zero_label", "expand_temporal_dimension", "temporal_channel_major", "tortilla_file")


def _generic(args: dict[str, Any], data: dict[str, Any], unmapped: list[str]) -> None:
    img_glob = args.pop("img_grep", "*")
    label_glob = args.pop("label_grep", "*")
    ignore_ext = args.pop("ignore_split_file_extensions", True)
    substring = args.pop("allow_substring_split_file", True)
    for split in ("train", "val", "test"):
        root = args.pop(f"{split}_data_root", None)
        label_root = args.pop(f"{split}_label_data_root", None)
        split_file = args.pop(f"{split}_split", None)
        if not root:
            if split_file or label_root:
                unmapped.append(f"data.init_args.{split}_split/{split}_label_data_root without {split}_data_root")
            continue
        src: dict[str, Any] = {"image_root": str(root), "image_glob": img_glob, "label_glob": label_glob}
        if label_root:
            src["label_root"] = str(label_root)
        if split_file:
            src["split_file"] = str(split_file)
        if not ignore_ext:
            src["split_file_ignore_extensions"] = False
        if not substring:
            src["split_file_substring"] = False
        data[split] = src
    dataset_bands = args.pop("dataset_bands", None)
    output_bands = args.pop("output_bands", None)
    if any(isinstance(b, (list, tuple)) for b in (dataset_bands or []) + (output_bands or [])):
        unmapped.append("data.init_args.dataset_bands/output_bands with [start, end] band intervals: list the bands")
    if dataset_bands:
        data["dataset_bands"] = list(dataset_bands)
        data["bands"] = list(output_bands or dataset_bands)
    elif output_bands:
        data["bands"] = list(output_bands)
    for key in ("means", "stds"):
        if args.get(key) is not None:
            value = args.pop(key)
            if isinstance(value, str):
                unmapped.append(f"data.init_args.{key}={value!r}: statistics from a file; paste the numbers")
            else:
                data[key] = [float(v) for v in value]


def _sen1floods11(args: dict[str, Any], data: dict[str, Any], unmapped: list[str]) -> None:
    root = str(args.pop("data_root", "") or "")
    images, labels, split_dir = (os.path.join(root, d) for d in SEN1FLOODS11_DIRS)
    for split, name in SEN1FLOODS11_SPLITS.items():
        data[split] = {"image_root": images, "image_glob": SEN1FLOODS11_GLOBS[0], "label_root": labels,
                       "label_glob": SEN1FLOODS11_GLOBS[1],
                       "split_file": os.path.join(split_dir, f"flood_{name}_data.txt")}
    bands = list(args.pop("bands", None) or SEN1FLOODS11_BANDS)
    unknown = [b for b in bands if b not in SEN1FLOODS11_MEANS]
    if unknown:
        unmapped.append(f"data.init_args.bands {unknown}: not Sen1Floods11 bands (allowed: {SEN1FLOODS11_BANDS})")
        bands = [b for b in bands if b in SEN1FLOODS11_MEANS]
    data["dataset_bands"] = list(SEN1FLOODS11_BANDS)
    data["bands"] = bands
    data["means"] = [SEN1FLOODS11_MEANS[b] for b in bands]
    data["stds"] = [SEN1FLOODS11_STDS[b] for b in bands]
    # the data module's own defaults (it passes them to Sen1Floods11NonGeo)
    args.setdefault("constant_scale", 0.0001)
    args.setdefault("no_data_replace", 0)
    args.setdefault("no_label_replace", -1)
    if args.pop("use_metadata", False):
        unmapped.append("data.init_args.use_metadata: the dataset's dates/locations (geojson) are not read here")


def convert_layout(data_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Map a TerraTorch data module's layout, bands and pixel settings.

    Args:
        data_cfg: The config's ``data:`` block (``class_path`` + ``init_args``).

    Returns:
        ``(data, unmapped, rest)``: our ``data:`` keys, what changes the samples or values and cannot be mapped,
        and the ``init_args`` not consumed here (transforms, batch size, loader settings, ...), or ``None`` for
        ``data`` when the data module is not one this module knows (the caller keeps its older mapping).
    """
    cls = str(data_cfg.get("class_path", "")).rsplit(".", 1)[-1]
    args = dict(data_cfg.get("init_args") or {})
    data: dict[str, Any] = {}
    unmapped: list[str] = []
    if cls in ("GenericNonGeoSegmentationDataModule", "GenericNonGeoPixelwiseRegressionDataModule"):
        _generic(args, data, unmapped)
    elif cls == "Sen1Floods11NonGeoDataModule":
        _sen1floods11(args, data, unmapped)
    else:
        return {}, [], args
    if "constant_scale" in args:
        data["constant_scale"] = float(args.pop("constant_scale"))
    for key in ("no_data_replace", "no_label_replace"):
        if key in args:
            data[key] = args.pop(key)
    for key in UNMAPPABLE:
        if args.pop(key, None):
            unmapped.append(f"data.init_args.{key}: not supported by the data layout yet")
    return data, unmapped, args
