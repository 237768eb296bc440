"""``evaluate --split`` of a regression model reports R² (with RMSE and MAE) from the engine's all-reduced sums; the
values equal those computed here independently: the model on each val tile (``encdec.data.preprocess``) against
its float target, NaN targets left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from tests.unit._predict_models import write_scene

HLS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
RECIPE = """
task: regression
model:
  backbone: prithvi_eo_tiny
  backbone_pretrained: false
  backbone_img_size: 32
  backbone_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
  necks: [{name: SelectIndices, indices: [1, 3]}, {name: ReshapeTokensToImage}]
  decoder: FCNDecoder
  decoder_channels: 16
data:
  train: {tiles: ROOT}
  val: {tiles: ROOT}
  bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
  means: [0.1, 0.1, 0.1, 0.3, 0.2, 0.1]
  stds: [0.05, 0.05, 0.05, 0.1, 0.1, 0.05]
  img_size: 32
  global_batch_size: 2
train: {max_steps: 2, precision: fp32}
"""


def _tiles(root: Path) -> list[tuple[Path, Path]]:
    root.mkdir()
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(3):
        img = (0.15 + 0.05 * rng.normal(size=(6, 32, 32))).astype(np.float32)
        target = (img[3] - img[2] + 0.01 * rng.normal(size=(32, 32))).astype(np.float32)[None]  # NDVI-like
        target[0, :4, :4] = np.nan  # no target there: left out of every sum
        ip, mp = write_scene(root / f"t{i}_img.tif", img), write_scene(root / f"t{i}_mask.tif", target)
        with rasterio.open(ip, "r+") as f:
            f.descriptions = tuple(HLS)
        pairs.append((ip, mp))
    return pairs


def test_evaluate_split_reports_r2_of_the_val_tiles(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from encdec.data.preprocess import preprocess
    from encdec.launcher.commands.evaluate_split import evaluate_split
    from encdec.launcher.commands.export_cmd import inference_data
    from encdec.launcher.commands.predict_cmd import resolve_model
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.models import build_model

    pairs = _tiles(tmp_path / "tiles")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(RECIPE.replace("ROOT", str(tmp_path / "tiles")))
    recipe = load_recipe(run / "recipe.yaml")
    torch.manual_seed(0)
    net = build_model(recipe.task, **recipe.model.factory_kwargs())
    export = run / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(export / "model.safetensors"))
    doc = {"task": recipe.task, "model": recipe.model.factory_kwargs(), "data": inference_data(recipe)}
    (export / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    m = evaluate_split(resolve_model(str(export)), "val", tmp_path / "ev")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["r2"] == m["r2"]

    preds, targets = [], []
    net.eval()
    for ip, mp in pairs:
        with rasterio.open(ip) as f:
            x, _ = preprocess(f.read(), recipe.data, descriptions=f.descriptions, nodata=f.nodata)
        with torch.no_grad():
            preds.append(net(torch.from_numpy(x)[None]).output.reshape(-1).numpy().astype(np.float64))
        with rasterio.open(mp) as f:
            targets.append(f.read(1).reshape(-1).astype(np.float64))
    p, y = np.concatenate(preds), np.concatenate(targets)
    ok = ~np.isnan(y)
    err = p[ok] - y[ok]
    assert ok.sum() == 3 * (32 * 32 - 16)
    assert m["rmse"] == pytest.approx(np.sqrt((err**2).mean()), rel=1e-5)
    assert m["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-5)
    assert m["r2"] == pytest.approx(1 - (err**2).sum() / ((y[ok] - y[ok].mean()) ** 2).sum(), rel=1e-5)
