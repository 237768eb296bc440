"""``convert-terratorch``'s data module mapping: the converted ``data:`` section reads exactly TerraTorch's samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from encdec.config import DataSection
from encdec.data import build_iterator
from encdec.launcher.commands.convert_data_layout import convert_layout

FIX = Path(__file__).parent / "fixtures" / "terratorch_layouts"
META = json.loads((FIX / "reference.json").read_text())


def _files(data: dict, split: str) -> list[str]:
    cfg = {**data, "val": data[split], "global_batch_size": 1, "img_size": 16}
    cfg["num_frames"] = cfg.get("num_frames", 1)
    it = build_iterator(DataSection.model_validate(cfg), split="val")
    names = [Path(s.images[0]).name for s in it.loader.samples]
    it.close()
    return names


@pytest.mark.parametrize("name", ["sen1floods11", "firescars", "multicrop"])
def test_generic_data_module_converts_to_the_same_samples(name):
    args = META["layouts"][name]["datamodule_args"]
    root = FIX / name
    init = {k: (str(root / v) if k.endswith(("_root", "_split")) else v) for k, v in args.items()}
    data, unmapped, rest = convert_layout({"class_path": "terratorch.datamodules.GenericNonGeoSegmentationDataModule",
                                           "init_args": init})
    assert unmapped == [] and set(rest) == {"num_classes"}
    assert data["bands"] == args["output_bands"] and data["dataset_bands"] == args["dataset_bands"]
    assert data.get("constant_scale", 1.0) == args.get("constant_scale", 1.0)
    # expand_temporal_dimension: 18 bands in the files / 6 dataset_bands = 3 time steps, read from the files
    assert data.get("num_frames", 1) == (3 if args.get("expand_temporal_dimension") else 1)
    for split in ("train", "val"):
        assert _files(data, split) == [Path(f).name for f in META["layouts"][name][f"{split}_files"]]


def test_sen1floods11_data_module_converts_to_its_fixed_layout(tmp_path):
    """Sen1Floods11NonGeoDataModule's own folders, split files, band list, scale and statistics."""
    src = FIX / "sen1floods11"
    hand = tmp_path / "v1.1" / "data" / "flood_events" / "HandLabeled"
    shutil.copytree(src / "S2Hand", hand / "S2Hand")
    shutil.copytree(src / "LabelHand", hand / "LabelHand")
    splits = tmp_path / "v1.1" / "splits" / "flood_handlabeled"
    splits.mkdir(parents=True)
    shutil.copy(src / "splits" / "flood_train_data.txt", splits)
    shutil.copy(src / "splits" / "flood_valid_data.txt", splits)
    bands = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
    data, unmapped, rest = convert_layout({"class_path": "terratorch.datamodules.Sen1Floods11NonGeoDataModule",
                                           "init_args": {"data_root": str(tmp_path), "bands": bands,
                                                         "batch_size": 16, "use_metadata": True}})
    assert data["constant_scale"] == 0.0001 and data["no_data_replace"] == 0 and data["no_label_replace"] == -1
    assert data["bands"] == bands and len(data["dataset_bands"]) == 13
    assert data["means"][0] == pytest.approx(0.1412956) and data["stds"][-1] == pytest.approx(0.07659938)
    assert rest == {"batch_size": 16} and unmapped == [] and data["location_coords"] is True  # the model takes no dates
    _, unmapped, _ = convert_layout({"class_path": "Sen1Floods11NonGeoDataModule",
                                     "init_args": {"data_root": str(tmp_path), "use_metadata": True}},
                                    model={"backbone": "prithvi_eo_v2_300_tl"})
    assert len(unmapped) == 1 and "use_metadata: the acquisition dates (from Sen1Floods11_Metadata.geojson)" in unmapped[0]
    for split in ("train", "val"):
        assert _files(data, split) == [Path(f).name for f in META["layouts"]["sen1floods11"][f"{split}_files"]]
    assert data["test"]["split_file"].endswith("flood_test_data.txt")
