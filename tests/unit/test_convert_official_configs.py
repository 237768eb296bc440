"""``convert-terratorch`` on the eight official Prithvi-EO-2.0 fine-tuning configs (``fixtures/prithvi_eo2_configs``).

Each either converts into a recipe that passes ``--dry-run`` and reads what TerraTorch 1.2.11's own data module
reads (samples, band order, statistics, time steps, normalised values: ``fixtures/terratorch_official``, written by
``make_terratorch_official.py`` from the trees ``fixtures/official_trees.py`` writes, here into a temporary
folder), or is refused naming exactly what cannot be mapped. Placeholders are refused by
name until filled.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from encdec.config import DataSection
from encdec.data import build_iterator
from encdec.launcher.commands.convert_terratorch import convert, convert_command
from encdec.launcher.recipe.errors import LaunchError

FIX = Path(__file__).parent / "fixtures"
CONFIGS = FIX / "prithvi_eo2_configs"
META = json.loads((FIX / "terratorch_official" / "reference.json").read_text())["datasets"]
REF = np.load(FIX / "terratorch_official" / "reference.npz")
NAMES = ["biomassters", "burnintensity", "firescars", "landslide", "multicrop", "sen1floods11", "sen4map_crops",
         "sen4map_land-cover"]
RESIZES = ["train_transform[0] Resize", "val_transform[0] Resize", "test_transform[0] Resize"]
# what each config cannot map (one substring per item, the whole list): the target's "fails naming exactly"
UNMAPPED = {
    "biomassters": ["BioMasstersNonGeoDataModule: samples come from the metadata table",
                    "BioMasstersNonGeoDataModule: as_time_series/use_four_frames",
                    "BioMasstersNonGeoDataModule: statistics are per sensor",
                    "train_transform[1] Resize", "val_transform[1] Resize", "val_transform[2] Flip"],
    "burnintensity": ["BurnIntensityNonGeoDataModule: each sample is three files",
                      "BurnIntensityNonGeoDataModule: the samples are filtered by Case_Name",
                      "BurnIntensityNonGeoDataModule: means/stds differ per time step"],
    "firescars": ["use_metadata: the acquisition dates (from the file names)", *RESIZES,
                  "backbone_bands names other bands than the data module reads (3: NIR_BROAD (read: NIR_NARROW))"],
    "landslide": ["Landslide4SenseNonGeoDataModule: images and masks are HDF5 files", "train_transform[1] Resize",
                  "val_transform[0] Resize", "test_transform[0] Resize"],
    "multicrop": ["reduce_zero_label", "use_metadata: the acquisition dates (from chips_df.csv)",
                  "val_transform[1] Flip"],
    "sen1floods11": RESIZES,
    "sen4map_crops": ["Sen4MapLucasDataModule: samples are HDF5 files", "Sen4MapLucasDataModule: crop_size/resize"],
}
UNMAPPED["sen4map_land-cover"] = UNMAPPED["sen4map_crops"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three datasets, written as ``make_terratorch_official.py`` wrote them for TerraTorch (same code)."""
    spec = importlib.util.spec_from_file_location("official_trees", FIX / "official_trees.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    roots: dict[str, Path] = module.make_all(tmp_path_factory.mktemp("official"))
    return roots


def filled(name: str, root: Path) -> dict:
    """The official config with its placeholders filled as a user would (the data root: ``root``)."""
    text = (CONFIGS / f"{name}.yaml").read_text()
    cfg = yaml.safe_load(text)
    necks = cfg["model"]["init_args"]["model_args"].get("necks", [])
    deepest = max((max(n["indices"]) for n in necks if n.get("name") == "SelectIndices"), default=0)
    text = text.replace("<prithvi_model>", "prithvi_eo_v2_600" if deepest > 23 else "prithvi_eo_v2_300")
    for hole in ("<your_dir>", "<PATH/TO/TRAINING/DIRECTORY>"):
        text = text.replace(hole, str(root / "runs"))
    for hole in ("<dataset_dir>", "<dataset_path>", "/dccstor/geofm-finetuning/hls_cdl_reclassed"):
        text = text.replace(hole, str(root))
    text = text.replace("<PATH/TO/", f"<{root}/").replace("<" + str(root), str(root))
    text = text.replace(".h5>", ".h5").replace(".pkl>", ".pkl").replace("CHECKPOINT>", "CHECKPOINT")
    return yaml.safe_load(text)


def command(tmp_path: Path, cfg: dict, *extra: str) -> Path:
    src = tmp_path / "config.yaml"
    src.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "recipe.yaml"
    convert_command(argparse.Namespace(config=str(src), output=str(out), allow_unmapped="--allow-unmapped" in extra))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_placeholders_are_refused_by_name(tmp_path, name):
    with pytest.raises(LaunchError, match="placeholder") as err:
        convert_command(argparse.Namespace(config=str(CONFIGS / f"{name}.yaml"), output=str(tmp_path / "r.yaml"),
                                           allow_unmapped=True))
    text = str(err.value)
    assert "trainer.default_root_dir" in text and "trainer.logger" not in text  # loggers are listed, not filled
    if not name.startswith("sen4map"):
        assert "model.init_args.model_args.backbone: <prithvi_model>" in text
    if name != "multicrop":  # its data_root is a real (someone's) path, not a placeholder
        assert "data.init_args.data_root: <dataset_" in text or "train_hdf5_path: <PATH/TO/train.h5>" in text
    assert not (tmp_path / "r.yaml").exists()


@pytest.mark.parametrize("name", NAMES)
def test_what_does_not_map_is_named_exactly(tmp_path, name):
    _, notes, unmapped = convert(filled(name, tmp_path))
    assert len(unmapped) == len(UNMAPPED[name]), unmapped
    for want, got in zip(UNMAPPED[name], unmapped, strict=True):
        assert want in got, (want, got)
    with pytest.raises(LaunchError, match=r"(?s)change the samples or their values.*--allow-unmapped"):
        command(tmp_path, filled(name, tmp_path))
    listed = " ".join(notes)
    if name in ("biomassters", "burnintensity", "multicrop"):  # backbone_pretrained written twice in these files
        written = (tmp_path / "twice.yaml")
        written.write_text((CONFIGS / f"{name}.yaml").read_text().replace("<", "").replace(">", ""))
        convert_command(argparse.Namespace(config=str(written), output=str(tmp_path / "r.yaml"), allow_unmapped=True))
        assert "'backbone_pretrained' given twice in one mapping; the last value is used" in (tmp_path / "r.yaml").read_text()
    assert "trainer.callbacks" in listed and "data.init_args.num_workers" in listed  # listed, never fatal
    if "data.class_path" in unmapped[0]:  # nothing of the data maps: no placeholder path that a dry-run could pass
        from encdec.launcher.recipe.errors import RecipeError
        from encdec.launcher.recipe.validate import recipe_from_dict

        out = command(tmp_path, filled(name, tmp_path), "--allow-unmapped")
        assert "CHANGE_ME" not in out.read_text() and "train" not in yaml.safe_load(out.read_text())["data"]
        with pytest.raises(RecipeError, match=r"data\.train"):
            recipe_from_dict(yaml.safe_load(out.read_text()), source=str(out))


def test_sen4map_prithvi_model_factory_arguments_map():
    recipe, _, unmapped = convert(filled("sen4map_crops", Path("/data")))
    model = recipe["model"]
    assert model["backbone_bands"][:2] == ["BLUE", "GREEN"] and len(model["backbone_bands"]) == 10
    assert model["backbone_num_frames"] == 12 and model["backbone_pretrained"] is True
    assert not {"in_channels", "bands", "num_frames", "pretrained"} & set(model)
    assert all("Sen4MapLucasDataModule" in u for u in unmapped)  # only the data module
    # the model block is accepted as it is (the older arguments were refused as unknown before)
    from encdec.launcher.recipe.validate import recipe_from_dict

    recipe["data"] = {"train": {"tiles": "/data"}, "val": {"tiles": "/data"}, "bands": model["backbone_bands"],
                      "num_frames": 12,
                      "means": [0.0] * 10, "stds": [1.0] * 10, "global_batch_size": 10}
    assert recipe_from_dict(recipe, source="sen4map_crops").model.backbone == "prithvi_eo_v2_300"
    cfg = filled("sen4map_crops", Path("/data"))
    cfg["model"]["init_args"]["model_args"]["in_channels"] = 6
    assert any("in_channels=6 but bands has 10" in u for u in convert(cfg)[2])


def _read(data: dict, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    spec = DataSection.model_validate({**data, "val": data[split], "global_batch_size": 1})
    it = build_iterator(spec, split="val")  # one ordered pass, no augmentation
    batches = list(it)
    files = [Path(s.images[0]).name for s in it.loader.samples]
    it.close()
    return (files, np.concatenate([b["image"].numpy() for b in batches]),
            np.concatenate([b["mask"].numpy() for b in batches]))


@pytest.mark.parametrize("name", ["sen1floods11", "firescars", "multicrop"])
def test_converted_recipe_dry_runs_and_reads_what_terratorch_reads(tmp_path, trees, name):
    from encdec.launcher import cli

    out = command(tmp_path, filled(name, trees[name]), "--allow-unmapped")
    text = out.read_text()
    assert "# NOT MAPPED, changes the samples or their values (--allow-unmapped):" in text
    recipe = yaml.safe_load(text)
    recipe["cluster"]["storage"] = str(tmp_path / "runs")
    out.write_text(yaml.safe_dump(recipe))
    # no GPU in CI: fp16 (the configs' 16-mixed) is refused on CPU, as it should be
    assert cli.main([str(out), "--dry-run", "--set", "train.precision=fp32"]) == 0
    data, ref = recipe["data"], META[name]
    assert data["bands"] == ref["bands"] and data["means"] == pytest.approx(ref["means"], rel=1e-6)
    assert data["stds"] == pytest.approx(ref["stds"], rel=1e-6)
    assert data.get("num_frames", 1) == (ref["image_shape"][1] if len(ref["image_shape"]) == 4 else 1)
    assert data["img_size"] == ref["image_shape"][-1]  # the files' own size: TerraTorch feeds them whole
    for split in ("train", "val", "test"):
        files, image, mask = _read(data, split)
        assert files == [Path(f).name for f in ref[f"{split}_files"]]
        np.testing.assert_allclose(image, REF[f"{name}/{split}_image"], rtol=1e-5, atol=1e-5)
        want = REF[f"{name}/{split}_mask"].reshape(mask.shape)
        if name == "multicrop":  # reduce_zero_label is listed as not mapped: TerraTorch's labels are ours - 1
            want = want + 1
        np.testing.assert_array_equal(mask, want)


def test_sen1floods11_without_its_resize_converts_without_allow_unmapped(tmp_path, trees):
    cfg = filled("sen1floods11", trees["sen1floods11"])
    for key in ("train_transform", "val_transform", "test_transform"):
        cfg["data"]["init_args"][key] = [t for t in cfg["data"]["init_args"][key] if "Resize" not in t["class_path"]]
    recipe = yaml.safe_load(command(tmp_path, cfg).read_text())
    data = recipe["data"]
    assert data["augment"] == {"hflip": True, "vflip": True} and data["img_size"] == 16
    assert data["constant_scale"] == 0.0001 and data["no_data_replace"] == 0 and data["no_label_replace"] == -1
    assert data["test"]["split_file"].endswith("flood_test_data.txt") and recipe["data"]["global_batch_size"] == 16
