"""``convert-terratorch`` for the data module: its layout, bands and pixel settings as our ``data:`` section.

TerraTorch's ``GenericNonGeoSegmentationDataModule`` (and the pixel-wise regression one) maps key for key onto
``encdec.config.data_layout``: ``<split>_data_root`` / ``<split>_label_data_root`` / ``img_grep`` / ``label_grep``
/ ``<split>_split`` -> ``data.<split>.image_root`` / ``label_root`` / ``image_glob`` / ``label_glob`` /
``split_file``; ``dataset_bands`` -> ``data.dataset_bands`` and ``output_bands`` -> ``data.bands``;
``constant_scale``, ``no_data_replace``, ``no_label_replace`` unchanged.

The official Prithvi-EO-2.0 configs' dataset-specific data modules are that layout with fixed folders, globs, split
files, bands and statistics, copied here from TerraTorch 1.2.11 (``terratorch/datamodules`` and ``datasets``,
Apache-2.0): ``Sen1Floods11NonGeoDataModule``, ``FireScarsNonGeoDataModule`` and
``MultiTemporalCropClassificationDataModule``. The others (Landslide4Sense, BurnIntensity, BioMassters, Sen4Map)
read HDF5 files, per-time-step folders or metadata tables the reader has no equivalent for: each is refused with
the exact reasons. What would change the samples or their values and has no equivalent is returned as
``unmapped`` so the conversion can refuse it.
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
UNMAPPABLE = ("reduce_zero_label", "tortilla_file")


def _generic(args: dict[str, Any], data: dict[str, Any], unmapped: list[str], model: Mapping[str, Any]) -> None:
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
    _time_steps(args, data, unmapped, model)


def _time_steps(args: dict[str, Any], data: dict[str, Any], unmapped: list[str], model: Mapping[str, Any]) -> None:
    """``expand_temporal_dimension``: a file's bands are frames of ``len(dataset_bands)`` bands, time-major (TerraTorch
    rearranges ``(time channels) h w``), which is our ``num_frames`` band groups."""
    channel_major = args.pop("temporal_channel_major", False)
    if not args.pop("expand_temporal_dimension", False):
        return
    bands = data.get("dataset_bands")
    if channel_major:
        unmapped.append("data.init_args.temporal_channel_major: frames are read as time-major band groups here; "
                        "rewrite the files with all bands of one date together")
    elif not bands:
        unmapped.append("data.init_args.expand_temporal_dimension without dataset_bands: TerraTorch cuts the files "
                        "into frames of len(dataset_bands) bands; give dataset_bands")
    else:
        first = _first_image(data)
        frames = first[2] // len(bands) if first else model.get("backbone_num_frames")
        if frames:
            data["num_frames"] = int(frames)
        else:
            unmapped.append("data.init_args.expand_temporal_dimension: the time steps per file are unknown (files not "
                            "readable from here, no model.backbone_num_frames): set data.num_frames")


def _sen1floods11(args: dict[str, Any], data: dict[str, Any], unmapped: list[str], model: Mapping[str, Any]) -> None:
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
    _metadata(args, data, unmapped, model, "from Sen1Floods11_Metadata.geojson")


HLS_BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]  # FireScarsNonGeo/MultiTemporalCrop all_band_names
FIRESCARS_MEANS = dict(zip(HLS_BANDS, [0.033349706741586264, 0.05701185520536176, 0.05889748132001316,
                                       0.2323245113436119, 0.1972854853760658, 0.11944914225186566], strict=True))
FIRESCARS_STDS = dict(zip(HLS_BANDS, [0.02269135568823774, 0.026807560223070237, 0.04004109844362779,
                                      0.07791732423672691, 0.08708738838140137, 0.07241979477437814], strict=True))
MULTICROP_MEANS = dict(zip(HLS_BANDS, [494.905781, 815.239594, 924.335066, 2968.881459, 2634.621962, 1739.579917],
                           strict=True))
MULTICROP_STDS = dict(zip(HLS_BANDS, [284.925432, 357.84876, 575.566823, 896.601013, 951.900334, 921.407808],
                          strict=True))
MULTICROP_TIME_STEPS = 3  # MultiTemporalCropClassification.time_steps: 18 bands = 3 dates x 6
# the data modules whose files the reader cannot read as they ship, and why (each reason names what to change)
UNREADABLE_MODULES: dict[str, tuple[str, ...]] = {
    "Landslide4SenseNonGeoDataModule": (
        "images and masks are HDF5 files (data_root/images/<split>/image_*.h5, dataset 'img'; "
        "annotations/<split>/mask_*.h5, dataset 'mask'): the reader reads GeoTIFF/COG; convert them to GeoTIFF "
        "(14 bands in Landslide4SenseNonGeo.all_band_names order) and use GenericNonGeoSegmentationDataModule's "
        "layout",
    ),
    "BurnIntensityNonGeoDataModule": (
        "each sample is three files, data_root/{pre,during,post}/<id> listed in data_root/<split>.txt, with its mask "
        "in pre/BS_<id>: list them in a manifest (image 'pre|during|post', mask)",
        "the samples are filtered by Case_Name in BS_files_raw.csv (use_full_data) or "
        "BS_files_with_less_than_25_percent_zeros.csv: apply the filter when writing the manifest",
        "means/stds differ per time step (BurnIntensity's pre/during/post statistics): data.means/stds are one "
        "value per band for all frames",
    ),
    "BioMasstersNonGeoDataModule": (
        "samples come from the metadata table (The_BioMassters_-_features_metadata.csv.csv) with one file per "
        "month and sensor (<split>_features/<chip>_<S1|S2>_<month>.tif) and the AGBM target in <split>_agbm/: "
        "list them in a manifest (image '<month>|<month>|...', mask)",
        "as_time_series/use_four_frames/max_cloud_percentage/max_red_mean/include_corrupt/subset choose which "
        "months and chips are read, and the validation split is drawn from train with its seed: write that "
        "selection into the manifest",
        "statistics are per sensor (S1, S2 dictionaries): give data.means/stds for the bands you read",
    ),
    "Sen4MapLucasDataModule": (
        "samples are HDF5 files (train/val/test_hdf5_path) indexed by pickled key files (*_hdf5_keys_path, which "
        "are never loaded here: reading a pickle runs code): convert the monthly composites to GeoTIFF chips",
        "crop_size/resize/resize_to/resize_interpolation crop each 15 px chip and resize it bilinearly: the reader "
        "reads img_size windows and does not resample",
    ),
}


def _encodes_time(model: Mapping[str, Any]) -> bool:
    """Whether the model takes acquisition dates (``temporal_coords``): a ``_tl`` Prithvi or 'time' encoding."""
    coords = model.get("backbone_coords_encoding") or []
    return "time" in coords or str(model.get("backbone", "")).endswith("_tl")


def _metadata(args: dict[str, Any], data: dict[str, Any], unmapped: list[str], model: Mapping[str, Any],
              dates: str) -> None:
    """``use_metadata``: the tile centre (lat, lon) maps to ``location_coords``; dates only from a manifest."""
    if not args.pop("use_metadata", False):
        return
    # the tile centre in lat/lon from the file's CRS, as the data modules take it (they use the centre pixel's
    # coordinates: half a pixel away, ~1e-4 degrees for 30 m pixels)
    data["location_coords"] = True
    if _encodes_time(model):
        unmapped.append(f"data.init_args.use_metadata: the acquisition dates ({dates}) the model encodes "
                        "(backbone_coords_encoding 'time' or a _tl backbone) are not read from image folders: list "
                        "them in a manifest's time column, or drop 'time' from model.backbone_coords_encoding")


def _named_bands(args: dict[str, Any], all_bands: list[str], unmapped: list[str]) -> list[str]:
    bands = list(args.pop("bands", None) or all_bands)
    unknown = [b for b in bands if b not in all_bands]
    if unknown:
        unmapped.append(f"data.init_args.bands {unknown}: not bands of this dataset (allowed: {all_bands})")
    return [b for b in bands if b in all_bands]


def _fire_scars(args: dict[str, Any], data: dict[str, Any], unmapped: list[str], model: Mapping[str, Any]) -> None:
    root = str(args.pop("data_root", "") or "")
    # FireScarsNonGeo has splits train -> training/, val -> validation/; the module's test split reads "val"
    for split, folder in (("train", "training"), ("val", "validation"), ("test", "validation")):
        data[split] = {"image_root": os.path.join(root, folder), "image_glob": "*_merged.tif",
                       "label_glob": "*.mask.tif"}
    bands = _named_bands(args, HLS_BANDS, unmapped)
    data.update(dataset_bands=list(HLS_BANDS), bands=bands, means=[FIRESCARS_MEANS[b] for b in bands],
                stds=[FIRESCARS_STDS[b] for b in bands])
    args.setdefault("no_data_replace", 0)
    args.setdefault("no_label_replace", -1)
    _metadata(args, data, unmapped, model, "from the file names")


def _multi_temporal_crop(args: dict[str, Any], data: dict[str, Any], unmapped: list[str],
                         model: Mapping[str, Any]) -> None:
    root = str(args.pop("data_root", "") or "")
    for split, name in (("train", "training"), ("val", "validation"), ("test", "validation")):
        data[split] = {"image_root": os.path.join(root, f"{name}_chips"), "image_glob": "*_merged.tif",
                       "label_glob": "*.mask.tif", "split_file": os.path.join(root, f"{name}_data.txt")}
    bands = _named_bands(args, HLS_BANDS, unmapped)
    data.update(dataset_bands=list(HLS_BANDS), bands=bands, means=[MULTICROP_MEANS[b] for b in bands],
                stds=[MULTICROP_STDS[b] for b in bands])
    if args.pop("expand_temporal_dimension", True):
        data["num_frames"] = MULTICROP_TIME_STEPS
        if bands != HLS_BANDS:  # TerraTorch splits the 18 bands into frames of len(bands), not of 6
            unmapped.append(f"data.init_args.bands {bands} with expand_temporal_dimension: TerraTorch cuts the 18 "
                            f"bands into frames of {len(bands)} bands, not of the 6 a date has; use all six")
    else:
        unmapped.append("data.init_args.expand_temporal_dimension=false: TerraTorch then reads the first date's six "
                        "bands of the 18 only")
    if args.pop("reduce_zero_label", True):
        unmapped.append("data.init_args.reduce_zero_label: labels minus 1 (class 0 becomes -1, ignored) has no "
                        "equivalent; write the masks with classes from 0")
    args.pop("metadata_file_name", None)
    args.setdefault("no_data_replace", 0)
    args.setdefault("no_label_replace", -1)
    _metadata(args, data, unmapped, model, "from chips_df.csv")


MODULES = {
    "Sen1Floods11NonGeoDataModule": _sen1floods11,
    "FireScarsNonGeoDataModule": _fire_scars,
    "MultiTemporalCropClassificationDataModule": _multi_temporal_crop,
}
GENERIC = ("GenericNonGeoSegmentationDataModule", "GenericNonGeoPixelwiseRegressionDataModule")


def convert_layout(data_cfg: Mapping[str, Any], model: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Map a TerraTorch data module's layout, bands and pixel settings.

    Args:
        data_cfg: The config's ``data:`` block (``class_path`` + ``init_args``).
        model: The config's ``model_args`` (whether the model encodes dates decides if ``use_metadata`` matters).

    Returns:
        ``(data, unmapped, rest)``: our ``data:`` keys, what changes the samples or values and cannot be mapped,
        and the ``init_args`` not consumed here (transforms, batch size, loader settings, ...). A data module this
        module does not know, or whose files the reader cannot read, gives an empty ``data`` and its reasons.
    """
    cls = str(data_cfg.get("class_path", "")).rsplit(".", 1)[-1]
    args = dict(data_cfg.get("init_args") or {})
    data: dict[str, Any] = {}
    unmapped: list[str] = []
    if cls in GENERIC:
        _generic(args, data, unmapped, model or {})
    elif cls in MODULES:
        MODULES[cls](args, data, unmapped, model or {})
    elif cls in UNREADABLE_MODULES:
        return {}, [f"data.class_path {cls}: {why}" for why in UNREADABLE_MODULES[cls]], args
    else:
        known = sorted([*GENERIC, *MODULES])
        return {}, [f"data.class_path {data_cfg.get('class_path')!r}: a data module this converter does not know "
                    f"(known: {', '.join(known)}); describe its files with GenericNonGeoSegmentationDataModule's "
                    f"keys or write data.<split> yourself"], args
    if "constant_scale" in args:
        data["constant_scale"] = float(args.pop("constant_scale"))
    for key in ("no_data_replace", "no_label_replace"):
        if key in args:
            data[key] = args.pop(key)
    for key in UNMAPPABLE:
        if args.pop(key, None):
            unmapped.append(f"data.init_args.{key}: not supported by the data layout yet")
    return data, unmapped, args


def _first_image(data: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """``(width, height, bands)`` of the first training image, or None when not reachable from here."""
    import glob

    src = data.get("train") or {}
    if not src.get("image_root"):
        return None
    files = sorted(glob.glob(os.path.join(str(src["image_root"]), str(src.get("image_glob", "*")))))
    if not files:
        return None
    import rasterio

    try:
        with rasterio.open(files[0]) as ds:
            return int(ds.width), int(ds.height), int(ds.count)
    except rasterio.errors.RasterioError:
        return None


def native_size(data: Mapping[str, Any]) -> int | None:
    """The side of the first training image (the size TerraTorch feeds when no transform resizes or crops), or
    None when the files are not reachable from here or not square."""
    first = _first_image(data)
    return first[0] if first and first[0] == first[1] else None
