"""Dataset layouts as published datasets ship them (TerraTorch's generic data module), and their pixel settings.

Two small pydantic models, mixed into the recipe's ``data.<split>`` (``SplitLayout``) and ``data`` (``PixelLayout``)
sections. Their meaning is TerraTorch 1.2's ``GenericNonGeoSegmentationDataModule`` / ``GenericPixelWiseDataset``
(Sen1Floods11NonGeo, FireScarsNonGeo and MultiTemporalCropClassification are that layout with fixed globs):

- images are ``sorted(glob(image_root / image_glob))``, labels ``sorted(glob(label_root / label_glob))``
  (``label_root`` defaults to ``image_root``), and the i-th image is paired with the i-th label;
- a ``split_file`` lists sample ids, one a line; a file is kept when an id (extension dropped when
  ``split_file_ignore_extensions``) is a substring of its base name (its extension-less base name equal to the id
  when ``split_file_substring`` is false);
- ``dataset_bands`` names the bands of one frame of the files (frames are band groups: ``(time channels)``) and
  ``bands`` selects from it by name; pixel values are multiplied by ``constant_scale`` before ``(x - mean) / std``;
- ``no_data_replace`` replaces nodata pixels of the image (before scaling), ``no_label_replace`` those of the label.

We differ from TerraTorch where it would silently train on wrong data: image and label counts must match (TerraTorch
pairs by position whatever the counts), and an image without its label is an error, never "use the image as label".
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PixelLayout", "SplitLayout"]


class SplitLayout(BaseModel):
    """One split as image/label folders with globs and an optional split file (``data.<split>``)."""

    model_config = ConfigDict(extra="forbid")

    image_root: str | None = Field(
        None, description="Folder of the images (TerraTorch's <split>_data_root); use with image_glob."
    )
    label_root: str | None = Field(
        None, description="Folder of the labels (TerraTorch's <split>_label_data_root); default: image_root."
    )
    image_glob: str = Field(
        "*", description="Glob of image files inside image_root, e.g. '*_S2Hand.tif' (TerraTorch's img_grep)."
    )
    label_glob: str | None = Field(
        "*", description="Glob of label files inside label_root, e.g. '*_LabelHand.tif' (TerraTorch's label_grep); "
        "null: images only (no labels).",
    )
    split_file: str | None = Field(
        None, description="Text file of sample ids, one a line (TerraTorch's <split>_split); only files whose name "
        "contains an id are kept.",
    )
    split_file_ignore_extensions: bool = Field(
        True, description="Drop extensions of the ids and file names before matching (TerraTorch's "
        "ignore_split_file_extensions).",
    )
    split_file_substring: bool = Field(
        True, description="An id matches a file whose name contains it; false: the name must equal it (TerraTorch's "
        "allow_substring_split_file).",
    )


class PixelLayout(BaseModel):
    """How a file's bands and values become the model's input (``data``)."""

    model_config = ConfigDict(extra="forbid")

    dataset_bands: list[str | int] | None = Field(
        None, description="The files' own bands, one frame's worth, in file order (for files without band "
        "descriptions); data.bands then selects from this list by name.",
    )
    constant_scale: float = Field(
        1.0, gt=0, description="Multiply pixel values by this before normalising (e.g. 0.0001: reflectance x 1e4 "
        "-> reflectance); data.means/stds are in the scaled units, as in TerraTorch.",
    )
    no_data_replace: float | None = Field(
        None, description="Image nodata pixels get this value (before constant_scale and normalisation), and "
        "keep their labels, as in TerraTorch; null: they become 0 after normalisation and their labels are ignored.",
    )
    no_label_replace: int | None = Field(
        None, description="Label nodata pixels get this value (TerraTorch's no_label_replace); null: the ignore "
        "value (-1, NaN for regression).",
    )
    min_valid_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Skip chips with less than this fraction of valid (non-nodata) pixels as "
        "empty; an all-nodata chip is always skipped. Empty chips do not count against max_bad_fraction.",
    )
