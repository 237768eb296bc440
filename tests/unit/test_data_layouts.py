"""Real dataset layouts (Sen1Floods11, burn scars, multi-temporal crops) read exactly as TerraTorch reads them.

The fixture trees and TerraTorch 1.2.11's ``GenericNonGeoSegmentationDataModule`` output for them were written once
by ``fixtures/make_terratorch_datasets.py`` (versions in ``reference.json``); here the same layouts go through our
``data:`` section and reader, and the samples, band order, normalised values and masks must equal TerraTorch's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pydantic import ValidationError

from encdec.config import DataSection
from encdec.data import DataConfigError, build_iterator
from encdec.data.preprocess import preprocess

FIX = Path(__file__).parent / "fixtures" / "terratorch_layouts"
META = json.loads((FIX / "reference.json").read_text())
REF = np.load(FIX / "reference.npz")
LAYOUTS = sorted(META["layouts"])


def data_section(name: str) -> dict:
    """The ``data:`` section for a layout, key for key from the TerraTorch data module's arguments."""
    args = META["layouts"][name]["datamodule_args"]
    root = FIX / name
    cfg: dict = {"img_size": 16, "global_batch_size": 1, "bands": args["output_bands"],
                 "dataset_bands": args["dataset_bands"], "means": args["means"], "stds": args["stds"],
                 "num_frames": 3 if args.get("expand_temporal_dimension") else 1,
                 "constant_scale": args.get("constant_scale", 1.0),
                 "no_data_replace": args.get("no_data_replace"), "no_label_replace": args.get("no_label_replace")}
    for split in ("train", "val"):
        src = {"image_root": str(root / args[f"{split}_data_root"]), "image_glob": args["img_grep"],
               "label_glob": args["label_grep"]}
        if args.get(f"{split}_label_data_root"):
            src["label_root"] = str(root / args[f"{split}_label_data_root"])
        if args.get(f"{split}_split"):
            src["split_file"] = str(root / args[f"{split}_split"])
        cfg[split] = src
    return cfg


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_samples_bands_and_values_equal_terratorch(name, split):
    cfg = data_section(name)
    cfg["val"] = cfg[split]
    it = build_iterator(DataSection.model_validate(cfg), split="val")  # one ordered pass over the split's samples: no shuffling, no augmentation
    batches = list(it)
    root = FIX / name
    samples = it.loader.samples
    assert [str(Path(s.images[0]).relative_to(root)) for s in samples] == META["layouts"][name][f"{split}_files"]
    assert [str(Path(s.mask).relative_to(root)) for s in samples] == META["layouts"][name][f"{split}_labels"]
    ids = np.concatenate([b["sample_id"].numpy() for b in batches])
    assert ids.tolist() == list(range(len(samples)))
    image = np.concatenate([b["image"].numpy() for b in batches])
    mask = np.concatenate([b["mask"].numpy() for b in batches])
    want = REF[f"{name}/{split}_image"]
    assert image.shape == want.shape
    np.testing.assert_allclose(image, want, rtol=1e-5, atol=1e-5)  # float32 rounding of (x*k - m)/s
    np.testing.assert_array_equal(mask, REF[f"{name}/{split}_mask"])
    it.close()


@pytest.mark.parametrize("name", LAYOUTS)
def test_preprocess_of_a_whole_file_equals_the_training_read(name):
    """The function a predict command uses gives what training reads (and what TerraTorch yields)."""
    cfg = data_section(name)
    spec = DataSection.model_validate(cfg)
    first = FIX / name / META["layouts"][name]["val_files"][0]
    with rasterio.open(first) as ds:
        x, valid = preprocess(ds.read(), spec, descriptions=ds.descriptions, nodata=ds.nodata, path=str(first))
    np.testing.assert_allclose(x, REF[f"{name}/val_image"][0], rtol=1e-5, atol=1e-5)
    assert valid.shape == x.shape[-2:]


def test_layout_errors_name_the_field(tmp_path):
    # TerraTorch pairs the i-th image with the i-th label whatever the counts: one missing label shifts every pair
    shutil.copytree(FIX / "firescars" / "training", tmp_path / "training")
    next((tmp_path / "training").glob("*.mask.tif")).unlink()
    cfg = data_section("firescars")
    cfg["train"] = {**cfg["train"], "image_root": str(tmp_path / "training")}
    with pytest.raises(DataConfigError, match=r"data\.train: 3 images .* but 2 labels"):
        build_iterator(DataSection.model_validate(cfg))
    cfg = data_section("sen1floods11")
    cfg["train"] = {**cfg["train"], "image_glob": "*_S1Hand.tif"}
    with pytest.raises(DataConfigError, match=r"data\.train\.image_root=.*image_glob='\*_S1Hand\.tif' matches no"):
        build_iterator(DataSection.model_validate(cfg))
    (tmp_path / "ids.txt").write_text("Nowhere_1\n")
    cfg = data_section("sen1floods11")
    cfg["train"] = {**cfg["train"], "split_file": str(tmp_path / "ids.txt")}
    with pytest.raises(DataConfigError, match=r"data\.train\.split_file=.*selects none"):
        build_iterator(DataSection.model_validate(cfg))
    cfg = data_section("sen1floods11")
    cfg["bands"] = ["BLUE", "GREEN", "RED", "NIR", "SWIR_1", "SWIR_2"]
    # a band the files do not have is refused when the section is read (the launcher shows the recipe line)
    with pytest.raises(ValidationError, match=r"data\.bands=.*data\.dataset_bands.*NIR"):
        DataSection.model_validate(cfg)


def test_recipe_schema_takes_the_layout_and_hands_it_to_the_data_package():
    from encdec.launcher.recipe.errors import RecipeError
    from encdec.launcher.recipe.validate import recipe_from_dict

    base = {"task": "segmentation", "model": {"backbone": "prithvi_eo_tiny", "num_classes": 2},
            "train": {"max_steps": 1}}
    recipe = recipe_from_dict({**base, "data": data_section("multicrop")})
    spec = recipe.data
    assert spec.pixels.dataset_bands == META["layouts"]["multicrop"]["datamodule_args"]["dataset_bands"]
    layout = spec.train.layout
    assert layout is not None and layout.image_glob == "*_merged.tif" and layout.split_file.endswith("training_data.txt")
    bad = data_section("firescars")
    bad["train"] = {**bad["train"], "img_grep": "*_merged.tif"}  # TerraTorch's name, not ours: a clear error
    with pytest.raises(RecipeError, match="img_grep"):
        recipe_from_dict({**base, "data": bad})
    both = data_section("firescars")
    both["train"] = {**both["train"], "tiles": "/x"}
    with pytest.raises(RecipeError, match="exactly one of 'tiles', 'manifest', 'scenes' or 'image_root'"):
        recipe_from_dict({**base, "data": both})
