"""A real Landsat raster the project did not generate (rasterio's ``RGB.byte.tif``: 3 uint8 bands, nodata 0 around
the rotated scene, EPSG:32618) through ``encdec-launch predict`` end to end with the quickstart model (tiny Prithvi
+ LoRA + UperNet, exported): the 6-band scene the model needs is built from its bands, as training's test of the
same raster does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
import yaml

from encdec.launcher.cli import main

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "tests" / "data" / "real"


def _landsat_six_bands(path: Path) -> tuple[Path, np.ndarray]:
    """A 200 x 240 corner of RGB.byte.tif (its nodata border and the scene, 47 % nodata; the corner keeps the test
    at seconds) as a 6-band int16 reflectance-like scene (nodata -9999 where the scene has none) with HLS band names
    (predict, like training, selects bands by name); the mask of its nodata pixels."""
    from rasterio.windows import Window

    with rasterio.open(REAL / "RGB.byte.tif") as src:
        win = Window(0, 100, 240, 200)
        rgb, profile = src.read(window=win).astype(np.int16), src.profile
        profile.update(width=240, height=200, transform=src.window_transform(win))
    nodata = (rgb == 0).any(axis=0)
    r, g, b = rgb
    six = np.stack([b, g, r, (r + g) // 2, (g + b) // 2, (r + b) // 2]) * 10
    six[:, nodata] = -9999
    profile.update(count=6, dtype="int16", nodata=-9999)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(six)
        dst.descriptions = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")  # bands by name, as training
    return path, nodata


def _quickstart_export(tmp_path: Path) -> Path:
    """An export folder of the quickstart recipe's model as ``export_run`` writes it (the plain model: LoRA merged,
    no ``peft_config``) with its initial weights (predict needs a model, not a good one), and class names in its
    data block as the export may write them."""
    import torch
    from safetensors.torch import save_file

    from encdec.launcher.commands.export_cmd import inference_data
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.models import build_model

    text = (REPO / "recipes" / "quickstart.yaml").read_text().replace("data/quickstart", str(tmp_path / "tiles"))
    (tmp_path / "recipe.yaml").write_text(text)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    block = {**recipe.model.without_peft().factory_kwargs(), "backbone_pretrained": False}
    torch.manual_seed(0)
    net = build_model(recipe.task, **block)
    out = tmp_path / "export"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    doc = {"task": recipe.task, "model": block, "data": {**inference_data(recipe), "class_names": ["land", "water"]}}
    (out / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def test_landsat_scene_with_nodata_borders_predicts_end_to_end(tmp_path: Path) -> None:
    scene, nodata = _landsat_six_bands(tmp_path / "landsat.tif")
    export = _quickstart_export(tmp_path)
    out = tmp_path / "maps"
    assert main(["predict", str(export), str(scene), "-o", str(out), "--probabilities", "--batch-size", "32"]) == 0

    assert sorted(p.name for p in out.iterdir()) == ["landsat.png", "landsat.tif", "landsat_probabilities.tif"]
    with rasterio.open(scene) as src, rasterio.open(out / "landsat.tif") as pred:
        assert (pred.crs, pred.transform, pred.shape) == (src.crs, src.transform, src.shape)
        assert src.crs.to_epsg() == 32618
        assert pred.nodata == 255 and pred.profile["tiled"]
        cls = pred.read(1)
        assert json.loads(pred.tags()["class_names"]) == ["land", "water"]
    assert (cls[nodata] == 255).all() and set(np.unique(cls[~nodata])) <= {0, 1}
    assert 0.45 < nodata.mean() < 0.5  # the scene's real nodata border, not an all-nodata output
    with rasterio.open(out / "landsat_probabilities.tif") as prob:
        p = prob.read().astype(np.int32)
        assert prob.descriptions == ("p(land)", "p(water)")
    assert (p[:, nodata] == 255).all()
    assert np.abs(p[:, ~nodata].sum(axis=0) - 254).max() <= 1  # uint8 probabilities (x254) sum to 1 where valid
    assert not (out / ".parts").exists()
