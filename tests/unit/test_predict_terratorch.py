"""A TerraTorch run as predict's MODEL: ``predict RUN.ckpt --config CONFIG.yaml`` (or ``CONFIG.yaml --checkpoint
RUN.ckpt``). The config is mapped by ``convert-terratorch``; the checkpoint, in TerraTorch 1.2.11's key layout
(``fixtures/terratorch_keys_prithvi_fcn.json``) and Lightning's file layout with a pickled object of a class that
is not installed, is read by the safe loader (nothing in it runs) and loaded strictly."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

import encdec
from encdec.launcher.cli import main
from encdec.launcher.recipe.errors import LaunchError
from tests.unit._predict_models import write_scene

FIXTURES = Path(__file__).parent / "fixtures"
HLS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
MEANS = [0.05, 0.07, 0.08, 0.25, 0.2, 0.12]
STDS = [0.03, 0.03, 0.04, 0.08, 0.07, 0.06]


def _config(tmp_path: Path) -> Path:
    args = json.loads((FIXTURES / "terratorch_keys_prithvi_fcn.json").read_text())["model_args"]
    # pretrained=True as users write it: predict must take every weight from the checkpoint, never download
    args = {**args, "backbone_pretrained": True, "backbone_img_size": 32, "backbone_bands": HLS}
    cfg = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 3, "precision": "32"},
        "data": {"class_path": "terratorch.datamodules.GenericNonGeoSegmentationDataModule",
                 "init_args": {"batch_size": 4, "num_classes": 2, "img_grep": "*_img.tif", "label_grep": "*_mask.tif",
                               "train_data_root": "/nonexistent/train", "means": MEANS, "stds": STDS,
                               "dataset_bands": HLS, "output_bands": HLS}},
        "model": {"class_path": "terratorch.tasks.SemanticSegmentationTask",
                  "init_args": {"model_factory": "EncoderDecoderFactory", "model_args": args, "loss": "ce"}},
    }
    path = tmp_path / "tt_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """TerraTorch's keys with random tensors, saved as Lightning does (``model.`` prefix, hyper-parameters as an
    object of a module the reader cannot import)."""
    keys = json.loads((FIXTURES / "terratorch_keys_prithvi_fcn.json").read_text())["keys"]
    g = torch.Generator().manual_seed(7)
    sd = {k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g) * 0.2
          for k, s in keys.items()}
    mod = types.ModuleType("terratorch_fake_hparams")

    class Hparams:
        pass

    Hparams.__module__, Hparams.__qualname__ = mod.__name__, "Hparams"
    mod.Hparams = Hparams  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    try:
        path = tmp_path / "tt_run.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "hyper_parameters": Hparams()}, path)
    finally:
        del sys.modules[mod.__name__]
    return path, sd


def _scene(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    data = (np.array(MEANS)[:, None, None] + rng.normal(size=(6, 40, 52)) * np.array(STDS)[:, None, None])
    data = data.astype(np.float32)
    data[:, :3, :4] = -9999
    return write_scene(tmp_path / "hls_scene.tif", data, nodata=-9999)


def test_terratorch_checkpoint_and_config_predict(tmp_path: Path) -> None:
    from encdec.launcher.commands.predict_cmd import resolve_model
    from encdec.models import build_model
    from encdec.models.terratorch_ckpt import load_terratorch_weights, read_checkpoint

    cfg, (ckpt, tt_sd) = _config(tmp_path), _checkpoint(tmp_path)
    scene = _scene(tmp_path)
    assert main(["predict", str(ckpt), str(scene), "-o", str(tmp_path / "a"), "--config", str(cfg),
                 "--no-quicklook"]) == 0
    spec = resolve_model(str(ckpt), config=str(cfg))
    assert resolve_model(str(cfg), checkpoint=str(ckpt)) == spec  # MODEL=CONFIG --checkpoint RUN.ckpt: the same
    assert (spec.kind, spec.task, spec.img_size, spec.data.bands) == ("terratorch", "segmentation", 32, HLS)
    assert spec.data.means == MEANS
    net = spec()  # the model predict used: TerraTorch's tensors under our names
    # torch.equal, not torch.testing: the latter imports torch.distributed.tensor (seconds)
    assert torch.equal(net.state_dict()["encoder.patch_embed.proj.weight"], tt_sd["encoder.patch_embed.proj.weight"])

    # reference: the same weights loaded by hand, predicted through the API with the CLI's tiling
    ref = build_model("segmentation", **{**spec.model_block, "backbone_pretrained": False})
    load_terratorch_weights(ref, read_checkpoint(ckpt), strict=True)
    tiled = {"crop": 32, "stride": 28, "delta": 2}
    encdec.predict(ref, [scene], tmp_path / "ref", data=spec.data, tiled=tiled, quicklook=False)
    other = build_model("segmentation", **{**spec.model_block, "backbone_pretrained": False})  # untrained weights
    encdec.predict(other, [scene], tmp_path / "other", data=spec.data, tiled=tiled, quicklook=False)
    with rasterio.open(tmp_path / "ref" / "hls_scene.tif") as f:
        want, transform = f.read(1), f.transform
    with rasterio.open(tmp_path / "a" / "hls_scene.tif") as f:
        got = f.read(1)
        assert f.transform == transform and json.loads(f.tags()["class_names"]) == ["class 0", "class 1"]
    np.testing.assert_array_equal(got, want)
    assert (got[:3, :4] == 255).all() and set(np.unique(got[3:])) <= {0, 1}
    with rasterio.open(tmp_path / "other" / "hls_scene.tif") as f:
        assert (f.read(1) != want).any()  # the checkpoint's weights, not any weights, made the map


def test_terratorch_model_errors_name_the_fix(tmp_path: Path) -> None:
    from encdec.launcher.commands.predict_cmd import resolve_model

    cfg = _config(tmp_path)
    with pytest.raises(LaunchError, match="needs its checkpoint and its config"):
        resolve_model(str(cfg))  # a config without --checkpoint
    with pytest.raises(LaunchError, match=r"RUN\.ckpt --config CONFIG\.yaml"):
        resolve_model(str(tmp_path / "missing.ckpt"), config=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    spec = resolve_model(str(bad), config=str(cfg))
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        spec()
