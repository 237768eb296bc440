"""The recipe's ``data:`` section as typed values, checked once with errors that name the field.

Components below take these plain dataclasses, never the recipe schema (HOUSE_STYLE: config becomes objects only
in builder functions). Every key read here is listed in ``DATA_KEYS`` / ``SPLIT_KEYS`` / ``AUGMENT_KEYS`` /
``READER_KEYS`` so the launcher's schema can be checked against them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from encdec.config.data_layout import PixelLayout, SplitLayout

# Prithvi-EO-2.0 HLS statistics (REFERENCE.md, reflectance x 1e4), the defaults for the six HLS bands.
HLS_BANDS: tuple[str, ...] = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
HLS_MEANS: tuple[float, ...] = (1087.0, 1342.0, 1433.0, 2734.0, 1958.0, 1363.0)
HLS_STDS: tuple[float, ...] = (2248.0, 2179.0, 2178.0, 1850.0, 1242.0, 1049.0)

DATA_KEYS = (
    "train", "val", "test", "bands", "means", "stds", "img_size", "num_frames", "global_batch_size", "augment",
    "max_bad_fraction", "reader", "location_coords", "feed", *PixelLayout.model_fields,
)
SPLIT_KEYS = ("tiles", "manifest", "scenes", "stride", "image_suffix", "mask_suffix", "split",
              *SplitLayout.model_fields)
AUGMENT_KEYS = ("hflip", "vflip", "rot90", "random_crop")
READER_KEYS = ("threads", "prefetch_batches", "ray_cpus_per_task", "ray_prefetch_batches")


class DataConfigError(ValueError):
    """A ``data:`` setting that cannot work; the message names the field, the value, what is allowed and the fix."""


@dataclass(frozen=True)
class SplitSpec:
    """Where one split's samples come from (``data.train`` / ``data.val``).

    Attributes:
        tiles: Folder(s) or glob(s) of image tiles; masks are paired by the suffix rule.
        manifest: CSV or Parquet file listing samples (columns: image, mask, split, label, time, lat, lon).
        scenes: Folder(s) or glob(s) of large scenes to chip into ``img_size`` windows.
        stride: Chip stride in pixels for ``scenes`` (default ``img_size``: no overlap).
        image_suffix: File-name ending of image files in a tile folder.
        mask_suffix: File-name ending of the paired mask files (``None``: images only).
        split: Row filter for a manifest's ``split`` column (default: the split's own name).
    """

    tiles: tuple[str, ...] = ()
    manifest: str | None = None
    scenes: tuple[str, ...] = ()
    stride: int | None = None
    image_suffix: str = "_img.tif"
    mask_suffix: str | None = "_mask.tif"
    split: str | None = None
    layout: SplitLayout | None = None  # image/label folders + globs + split file (encdec.config.data_layout)


@dataclass(frozen=True)
class AugmentSpec:
    """Worker-side augmentations, applied identically to image and mask (train split only)."""

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    random_crop: bool = False

    @property
    def any(self) -> bool:
        """Whether any augmentation is on."""
        return self.hflip or self.vflip or self.rot90 or self.random_crop


@dataclass(frozen=True)
class ReaderSpec:
    """Prefetching reader settings (``data.reader``)."""

    threads: int = 4
    prefetch_batches: int = 2
    ray_cpus_per_task: float = 0.5
    ray_prefetch_batches: int = 2


@dataclass(frozen=True)
class DataSpec:
    """The parsed ``data:`` section."""

    splits: Mapping[str, SplitSpec]
    bands: tuple[int | str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    img_size: int
    num_frames: int
    global_batch_size: int
    augment: AugmentSpec
    max_bad_fraction: float
    reader: ReaderSpec
    location_coords: bool = False
    # dataset_bands, constant_scale, no_data_replace, no_label_replace, min_valid_fraction (encdec.config.data_layout)
    pixels: PixelLayout = field(default_factory=lambda: PixelLayout.model_validate({}))


def _layout(path: str, model: type[Any], raw: Mapping[str, Any]) -> Any:
    """Validate the layout keys of ``raw`` with their pydantic model; errors name the field and the value."""
    given = {k: raw[k] for k in model.model_fields if k in raw}
    try:
        return model(**given)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise DataConfigError(f"{path}.{field}={first.get('input')!r} is not valid: {first['msg']}. "
                              f"Fix: see the field's description in encdec/config/data_layout.py.") from e


def _fail(path: str, value: Any, allowed: str, fix: str) -> DataConfigError:
    return DataConfigError(f"{path}={value!r} is not valid: allowed {allowed}. Fix: {fix}")


def _check_keys(path: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise DataConfigError(
            f"{path} has unknown key(s) {unknown}; allowed: {list(allowed)}. Fix: remove or rename them."
        )


def _as_paths(path: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _fail(path, value, "a path/glob string or a list of them", "give a folder, a glob or a list of them")


def parse_split(name: str, raw: Any) -> SplitSpec:
    """Parse ``data.<name>``: a path/glob string, or a mapping with ``tiles``/``manifest``/``scenes``.

    Args:
        name: Split name (``train``, ``val``, ...), used in error messages and as the manifest row filter.
        raw: The recipe value.

    Returns:
        The split's source description.
    """
    path = f"data.{name}"
    if isinstance(raw, str) or (isinstance(raw, Sequence) and not isinstance(raw, Mapping)):
        return SplitSpec(tiles=_as_paths(path, raw), split=name)
    if not isinstance(raw, Mapping):
        raise _fail(path, raw, "a mapping {tiles|manifest|scenes: ...} or a path", f"set {path}.tiles: /my/tiles")
    _check_keys(path, raw, SPLIT_KEYS)
    layout = _layout(path, SplitLayout, raw) if raw.get("image_root") else None
    spec = SplitSpec(
        tiles=_as_paths(f"{path}.tiles", raw.get("tiles")),
        manifest=raw.get("manifest"),
        scenes=_as_paths(f"{path}.scenes", raw.get("scenes")),
        stride=raw.get("stride"),
        image_suffix=raw.get("image_suffix", "_img.tif"),
        mask_suffix=raw.get("mask_suffix", "_mask.tif"),
        split=raw.get("split", name),
        layout=layout,
    )
    given = [k for k in ("tiles", "manifest", "scenes", "image_root") if raw.get(k)]
    if len(given) != 1:
        raise _fail(path, dict(raw), "exactly one of tiles, manifest, scenes, image_root",
                    f"keep one source under {path}")
    if spec.stride is not None and (not isinstance(spec.stride, int) or spec.stride <= 0):
        raise _fail(f"{path}.stride", spec.stride, "a positive integer (pixels)", "e.g. stride: 224")
    return spec


def _positive_int(path: str, value: Any, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(path, value, "a positive integer", example)
    return value


def parse_data_config(cfg: Mapping[str, Any]) -> DataSpec:
    """Check and type the recipe's ``data:`` section.

    Args:
        cfg: The ``data:`` section as a plain dict (names from RECIPE.md).

    Returns:
        The parsed spec. Means/stds default to the Prithvi HLS statistics when the bands are the HLS bands.

    Raises:
        DataConfigError: For any invalid or missing setting, naming the field and the fix.
    """
    if not isinstance(cfg, Mapping):
        raise _fail("data", cfg, "a mapping (the recipe's data: section)", "pass the data section as a dict")
    _check_keys("data", cfg, DATA_KEYS)
    splits = {name: parse_split(name, cfg[name]) for name in ("train", "val", "test") if cfg.get(name) is not None}
    raw_bands = cfg.get("bands", list(HLS_BANDS))
    if not isinstance(raw_bands, Sequence) or isinstance(raw_bands, str) or not raw_bands:
        raise _fail("data.bands", raw_bands, "a non-empty list of band names or 0-based indexes", "bands: [BLUE, RED]")
    for b in raw_bands:
        if isinstance(b, bool) or not isinstance(b, (int, str)) or (isinstance(b, int) and b < 0):
            raise _fail("data.bands", raw_bands, "names (str) or 0-based indexes (int >= 0)", "bands: [BLUE, 3]")
    bands = tuple(raw_bands)
    pixels = _layout("data", PixelLayout, cfg)
    if pixels.dataset_bands is not None:
        missing = [b for b in bands if b not in pixels.dataset_bands]
        if missing:
            raise _fail("data.bands", list(bands), f"names from data.dataset_bands {pixels.dataset_bands}",
                        f"remove or rename {missing}, or add them to data.dataset_bands")
    # The HLS statistics are in the files' units (reflectance x 1e4): they cannot be defaults for scaled values.
    default_stats = tuple(str(b).upper() for b in bands) == HLS_BANDS and pixels.constant_scale == 1.0
    means = cfg.get("means") or (list(HLS_MEANS) if default_stats else None)
    stds = cfg.get("stds") or (list(HLS_STDS) if default_stats else None)
    if means is None or stds is None:
        raise DataConfigError(
            f"data.means/data.stds are missing for bands {list(bands)}: defaults exist only for the HLS bands "
            f"{list(HLS_BANDS)}. Fix: run `encdec-launch stats <tiles>` and paste its means/stds."
        )
    for key, vals in (("data.means", means), ("data.stds", stds)):
        if len(vals) != len(bands):
            raise _fail(key, list(vals), f"{len(bands)} numbers (one per band in data.bands)", "one value per band")
    if any(float(s) <= 0 for s in stds):
        raise _fail("data.stds", list(stds), "positive numbers", "use the per-band standard deviations")
    aug_raw = cfg.get("augment") or {}
    if not isinstance(aug_raw, Mapping):
        raise _fail("data.augment", aug_raw, "a mapping of flags", "augment: {hflip: true}")
    _check_keys("data.augment", aug_raw, AUGMENT_KEYS)
    reader_raw = cfg.get("reader") or {}
    if not isinstance(reader_raw, Mapping):
        raise _fail("data.reader", reader_raw, "a mapping", "reader: {threads: 4, prefetch_batches: 2}")
    _check_keys("data.reader", reader_raw, READER_KEYS)
    reader = ReaderSpec(**{k: reader_raw[k] for k in READER_KEYS if k in reader_raw})
    _positive_int("data.reader.threads", reader.threads, "threads: 4")
    _positive_int("data.reader.prefetch_batches", reader.prefetch_batches, "prefetch_batches: 2")
    frac = cfg.get("max_bad_fraction", 0.01)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
        raise _fail("data.max_bad_fraction", frac, "a number in [0, 1]", "max_bad_fraction: 0.01")
    return DataSpec(
        splits=splits,
        bands=bands,
        means=tuple(float(m) for m in means),
        stds=tuple(float(s) for s in stds),
        img_size=_positive_int("data.img_size", cfg.get("img_size", 224), "img_size: 224"),
        num_frames=_positive_int("data.num_frames", cfg.get("num_frames", 1), "num_frames: 1"),
        global_batch_size=_positive_int("data.global_batch_size", cfg.get("global_batch_size", 8), "e.g. 64"),
        augment=AugmentSpec(**{k: bool(aug_raw[k]) for k in AUGMENT_KEYS if k in aug_raw}),
        max_bad_fraction=float(frac),
        reader=reader,
        location_coords=bool(cfg.get("location_coords", False)),
        pixels=pixels,
    )
