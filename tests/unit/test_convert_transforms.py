"""``convert-terratorch``'s albumentations transforms: each maps to ``data.augment`` or is refused by name."""

from __future__ import annotations

import argparse

import pytest
import yaml

from encdec.launcher.commands.convert_terratorch import convert_command
from encdec.launcher.commands.convert_transforms import convert_transforms
from encdec.launcher.recipe.errors import LaunchError


def T(name: str, **kw: object) -> dict:
    return {"class_path": f"albumentations.{name}", **({"init_args": kw} if kw else {})}


TOTENSOR = {"class_path": "albumentations.pytorch.transforms.ToTensorV2"}


@pytest.mark.parametrize(("train", "augment", "crop"), [
    ([T("D4"), TOTENSOR], {"hflip": True, "rot90": True}, None),  # uniform over the 8 symmetries = hflip x rot90
    ([T("HorizontalFlip", p=0.5)], {"hflip": True}, None),
    ([T("VerticalFlip")], {"vflip": True}, None),  # albumentations' default p=0.5
    ([T("RandomRotate90")], {"rot90": True}, None),  # albumentations 2's default p=1: a uniform quarter turn
    ([T("HorizontalFlip"), T("VerticalFlip"), T("RandomCrop", height=64, width=64), TOTENSOR],
     {"hflip": True, "vflip": True, "random_crop": True}, 64),
    ([{"class_path": "FlattenTemporalIntoChannels"}, TOTENSOR,
      {"class_path": "UnflattenTemporalFromChannels", "init_args": {"n_timesteps": 3}}], {}, None),
])
def test_training_transforms_map(train, augment, crop):
    args = {"train_transform": train, "val_transform": [TOTENSOR], "batch_size": 4}
    got, got_crop, notes, unmapped = convert_transforms(args)
    assert (got, got_crop, unmapped, notes) == (augment, crop, [], [])
    assert args == {"batch_size": 4}  # the transform keys are consumed


def test_flips_with_other_probabilities_map_with_a_note():
    got, _, notes, unmapped = convert_transforms({"train_transform": [T("Flip"), T("RandomRotate90", p=0.5)]})
    assert got == {"hflip": True, "vflip": True, "rot90": True} and unmapped == []
    assert "unflipped 1/4 of the time instead of 0.5" in notes[0] and "albumentations 2" in notes[0]
    assert "instead of 0.625" in notes[1]


@pytest.mark.parametrize(("args", "named"), [
    ({"train_transform": [T("Resize", height=224, width=224)]}, "train_transform[0] Resize(height=224, width=224)"),
    ({"train_transform": [T("HorizontalFlip", p=1.0)]}, "HorizontalFlip(p=1.0): our flips have p=0.5"),
    ({"train_transform": [T("D4", p=0.5)]}, "D4(p=0.5)"),
    ({"train_transform": [T("RandomCrop", height=64, width=32)]}, "only square crops"),
    ({"train_transform": [TOTENSOR, T("GaussNoise", std_range=[0.1, 0.2])]},
     "train_transform[1] GaussNoise(std_range=[0.1, 0.2]): changes the pixels"),
    ({"train_transform": [T("Normalize")]}, "train_transform[0] Normalize: changes the pixels"),
    ({"val_transform": [T("HorizontalFlip")]}, "val_transform[0] HorizontalFlip: val samples are read unaugmented"),
    ({"test_transform": [T("CenterCrop", height=8, width=8)]}, "test_transform[0] CenterCrop"),
    ({"train_transform": {"class_path": "albumentations.Compose"}}, "not a list of transforms"),
])
def test_transforms_that_change_values_are_named(args, named):
    _, _, _, unmapped = convert_transforms(args)
    assert len(unmapped) == 1 and named in unmapped[0], unmapped


CONFIG = {
    "trainer": {"max_epochs": 2, "callbacks": [{"class_path": "RichProgressBar"}],
                "logger": {"class_path": "TensorBoardLogger", "init_args": {"save_dir": "<your_dir>"}}},
    "model": {"class_path": "terratorch.tasks.SemanticSegmentationTask",
              "init_args": {"model_args": {"backbone": "prithvi_eo_tiny", "decoder": "FCNDecoder", "num_classes": 2,
                                           "backbone_bands": ["BLUE", "GREEN"]}}},
    "data": {"class_path": "GenericNonGeoSegmentationDataModule",
             "init_args": {"batch_size": 2, "num_workers": 4, "train_data_root": "/data/train",
                           "output_bands": ["BLUE", "GREEN"], "means": [1.0, 2.0], "stds": [3.0, 4.0],
                           "train_transform": [T("Resize", height=32, width=32), T("D4"), TOTENSOR]}},
}


def test_command_refuses_unmapped_transforms_unless_allowed(tmp_path):
    src, out = tmp_path / "tt.yaml", tmp_path / "recipe.yaml"
    src.write_text(yaml.safe_dump(CONFIG))
    with pytest.raises(LaunchError, match=r"1 setting\(s\) change the samples.*\n  - .*Resize"):
        convert_command(argparse.Namespace(config=str(src), output=str(out), allow_unmapped=False))
    assert not out.exists()
    assert convert_command(argparse.Namespace(config=str(src), output=str(out), allow_unmapped=True)) == 0
    text = out.read_text()
    assert "# NOT MAPPED, changes the samples or their values (--allow-unmapped):\n#   - data.init_args.train_" in text
    recipe = yaml.safe_load(text)
    assert recipe["data"]["augment"] == {"hflip": True, "rot90": True}
    # loggers (with their placeholder), callbacks and loader settings are listed, never fatal
    for listed in ("trainer.callbacks", "trainer.logger.init_args.save_dir: placeholder", "data.init_args.num_workers"):
        assert listed in text, listed
    cfg = {**CONFIG, "data": {**CONFIG["data"], "init_args": {**CONFIG["data"]["init_args"],
                                                              "train_transform": [T("D4")]}}}
    src.write_text(yaml.safe_dump(cfg))
    assert convert_command(argparse.Namespace(config=str(src), output=str(out), allow_unmapped=False)) == 0
    assert "NOT MAPPED" not in out.read_text()


@pytest.mark.parametrize(("content", "said"), [(b"II*\x00\xff\xfe\x00", "is a TIFF/GeoTIFF image, not YAML text"),
                                               (b"model: [unclosed", "not a YAML file"),
                                               (b"- a list\n", "holds a list, not a TerraTorch config")])
def test_a_file_that_is_not_a_config_is_named(tmp_path, content, said):
    src = tmp_path / "scene.tif"
    src.write_bytes(content)
    with pytest.raises(LaunchError, match=said):
        convert_command(argparse.Namespace(config=str(src), output=None, allow_unmapped=False))
