"""The ``data:`` section: sources per split, bands and statistics, tile size, global batch, augmentation, reader."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from encdec.config.base import Section
from encdec.config.data_layout import PixelLayout, SplitLayout
from encdec.config.names import HLS_BANDS, HLS_MEANS, HLS_STDS

__all__ = ["AugmentSection", "DataSection", "DataSource", "ReaderSection", "SyntheticSpec", "SYNTHETIC_KINDS"]

#: what synthetic scenes a run can ask for (``data.<split>.synthetic.task``)
SyntheticKind = Literal["flood", "landcover"]
SYNTHETIC_KINDS: tuple[str, ...] = get_args(SyntheticKind)


def _paths(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class SyntheticSpec(Section):
    """Synthetic HLS-like tiles the launcher writes into ``tiles`` when that folder has none (demo, CI)."""

    n_tiles: int = Field(ge=1, le=100000, description="Tiles to write.")
    seed: int = Field(0, description="Seed of the scenes (use different seeds for train and val: disjoint scenes).")
    task: SyntheticKind = Field("flood", description="Mask kind: flood (water, 2 classes) or "
                                                "landcover (5 classes).")


class DataSource(SplitLayout, Section):
    """Where one split's samples come from: tile pairs, a manifest, large scenes to chip, or image/label folders
    (``image_root`` and the other ``SplitLayout`` fields: TerraTorch's generic layout)."""

    tiles: str | list[str] | None = Field(
        None, description="Folder(s) or glob(s) of image tiles; masks are paired by image_suffix -> mask_suffix."
    )
    manifest: str | None = Field(
        None, description="CSV/Parquet listing image, mask (or label), optional split, time, lat, lon."
    )
    scenes: str | list[str] | None = Field(
        None, description="Folder(s) or glob(s) of large scenes chipped into img_size windows (windowed reads)."
    )
    stride: int | None = Field(None, ge=1, description="Chip stride in pixels for scenes (default img_size).")
    image_suffix: str = Field("_img.tif", description="File-name ending of image files in a tile folder.")
    mask_suffix: str | None = Field("_mask.tif", description="File-name ending of the paired masks (null: none).")
    split: str | None = Field(None, description="Manifest rows whose 'split' column equals this (default: split name).")
    synthetic: SyntheticSpec | None = Field(
        None, description="Write synthetic tiles into `tiles` (a folder) before the run when it has none."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        from pydantic_core import PydanticCustomError

        if sum(bool(v) for v in (self.tiles, self.manifest, self.scenes, self.image_root)) != 1:
            raise PydanticCustomError("data_source", "give exactly one of 'tiles', 'manifest', 'scenes' or "
                                      "'image_root'", {})
        if self.synthetic is not None and not isinstance(self.tiles, str):
            raise PydanticCustomError("data_source", "'synthetic' needs 'tiles' to be one folder to write into", {})
        return self

    @property
    def layout(self) -> SplitLayout | None:
        """The image/label-folder layout of this split, None when it names tiles, a manifest or scenes."""
        if not self.image_root:
            return None
        return SplitLayout(**{k: getattr(self, k) for k in SplitLayout.model_fields})

    @property
    def tile_paths(self) -> tuple[str, ...]:
        """``tiles`` as a tuple of folders/globs (empty when the split is a manifest or scenes)."""
        return _paths(self.tiles)

    @property
    def scene_paths(self) -> tuple[str, ...]:
        """``scenes`` as a tuple of folders/globs."""
        return _paths(self.scenes)


class AugmentSection(Section):
    """Training augmentations, applied identically to image and mask on the worker."""

    hflip: bool = Field(False, description="Random horizontal flips.")
    vflip: bool = Field(False, description="Random vertical flips.")
    rot90: bool = Field(False, description="Random 90-degree rotations.")
    random_crop: bool = Field(False, description="Random crops (then resized back to img_size).")

    @property
    def any(self) -> bool:
        """Whether any augmentation is on."""
        return self.hflip or self.vflip or self.rot90 or self.random_crop


class ReaderSection(Section):
    """The per-rank prefetching reader (the default feed)."""

    threads: int = Field(4, ge=1, le=64, description="Decode threads per worker.")
    prefetch_batches: int = Field(2, ge=1, le=64, description="Micro-batches read ahead (bounds memory).")
    ray_cpus_per_task: float = Field(0.5, gt=0, description="CPUs per decode task (feed ray_data).")
    ray_prefetch_batches: int = Field(2, ge=1, description="Batches prefetched per worker (feed ray_data).")


class DataSection(PixelLayout, Section):
    """The data: sources, bands, statistics, tile size, global batch and augmentation; how file values become
    model inputs (``dataset_bands``, ``constant_scale``, nodata replacement: the ``PixelLayout`` fields)."""

    train: DataSource = Field(description="Training samples.")
    val: DataSource | None = Field(None, description="Held-out samples for validation (one pass, no augmentation).")
    test: DataSource | None = Field(None, description="Test samples (evaluated by `encdec-launch evaluate MODEL --split test`).")
    bands: list[str | int] = Field(
        default_factory=lambda: list[str | int](HLS_BANDS),
        min_length=1,
        description="Bands to read, by name (band description, e.g. BLUE) or 0-based index, in the model's order.",
    )
    means: list[float] | None = Field(
        None, description="Per-band means for normalisation (default: Prithvi HLS statistics for HLS band names)."
    )
    stds: list[float] | None = Field(None, description="Per-band standard deviations (same length as bands).")
    class_names: list[str] | None = Field(
        None, description="Names of the classes in label order (length model.num_classes); written into the exported "
        "model.yaml, where predict takes them for tags and legends.")
    img_size: int = Field(224, ge=8, le=8192, description="Tile size in pixels the model sees.")
    num_frames: int = Field(1, ge=1, description="Time steps per sample; >1 gives [C, T, H, W] inputs.")
    global_batch_size: int = Field(
        description="Samples per optimizer step over all workers; fixed across restarts. Per-worker micro-batch = "
        "global_batch_size / (workers x optim.grad_accum).",
        ge=1,
    )
    augment: AugmentSection = Field(default_factory=AugmentSection, description="Training augmentations.")  # type: ignore[arg-type]
    max_bad_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="Fail the run when more than this fraction of tiles is unreadable/bad."
    )
    reader: ReaderSection = Field(default_factory=ReaderSection, description="Per-rank reader settings.")  # type: ignore[arg-type]
    location_coords: bool = Field(
        False, description="Pass each tile's centre (lat, lon) to encoders that take it (Prithvi _tl)."
    )
    feed: Literal["reader", "ray"] = Field(
        "reader",
        description="reader: exact per-rank prefetching reader (default); ray: decode with Ray Data on the "
        "cluster's CPUs (see encdec.data for its exactness).",
    )

    @field_validator("bands")
    @classmethod
    def _band_indexes(cls, v: list[str | int]) -> list[str | int]:
        from pydantic_core import PydanticCustomError

        bad = [b for b in v if isinstance(b, int) and b < 0]
        if bad:
            raise PydanticCustomError("band_index", "band indexes are 0-based (>= 0); got {bad}", {"bad": bad})
        return v

    @model_validator(mode="after")
    def _stats_match_bands(self) -> DataSection:
        from pydantic_core import PydanticCustomError

        for key in ("means", "stds"):
            value = getattr(self, key)
            if value is not None and len(value) != len(self.bands):
                raise PydanticCustomError(
                    "stats_length",
                    "data.{key} has {n} values but data.bands has {b}",
                    {"key": key, "n": len(value), "b": len(self.bands), "sub": key},
                )
        if self.stds is not None and any(s <= 0 for s in self.stds):
            raise PydanticCustomError("stds_positive", "data.stds must all be > 0", {"sub": "stds"})
        if self.dataset_bands is not None:
            missing = [b for b in self.bands if b not in self.dataset_bands]
            if missing:
                raise PydanticCustomError(
                    "bands_not_in_dataset",
                    "data.bands={bands} must be names from data.dataset_bands {dataset}: remove or rename {missing}, "
                    "or add them to data.dataset_bands",
                    {"bands": repr(list(self.bands)), "dataset": repr(list(self.dataset_bands)),
                     "missing": repr(missing), "sub": "bands"},
                )
        return self

    def split(self, name: str) -> DataSource | None:
        """The source of split ``name`` (``train``, ``val``, ``test``), None when the recipe has none."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"data split {name!r} is not one of train, val, test")
        source: DataSource | None = getattr(self, name)
        return source

    @property
    def pixels(self) -> PixelLayout:
        """The pixel settings alone (what the reader and the shared preprocessing need)."""
        return PixelLayout(**{k: getattr(self, k) for k in PixelLayout.model_fields})

    @property
    def uses_hls_stats(self) -> bool:
        """Whether the bands are exactly the six HLS bands, whose Prithvi statistics are the defaults."""
        # the HLS statistics are in the files' units (reflectance x 1e4): no default for scaled values
        return tuple(str(b).upper() for b in self.bands) == HLS_BANDS and self.constant_scale == 1.0

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-band (means, stds): the recipe's, else the Prithvi HLS statistics for the HLS bands.

        Raises:
            ValueError: no statistics given for bands other than the HLS ones (the recipe loader reports this
                with the line; this is the engine's guard for sections built in code).
        """
        means = self.means or (list(HLS_MEANS) if self.uses_hls_stats else None)
        stds = self.stds or (list(HLS_STDS) if self.uses_hls_stats else None)
        if means is None or stds is None:
            raise ValueError(
                f"data.means/data.stds are missing for bands {list(self.bands)}: defaults exist only for the HLS "
                f"bands {list(HLS_BANDS)}. Fix: run `encdec-launch stats <tiles>` and paste its means/stds."
            )
        return tuple(float(m) for m in means), tuple(float(s) for s in stds)
