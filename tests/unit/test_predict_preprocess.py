"""Predict preprocesses scenes exactly as training does (``encdec.data.preprocess``): an export written with
``constant_scale``, ``dataset_bands`` (bands picked by name, reordered) and ``no_data_replace`` gives the same values
as preprocessing the scene with ``encdec.data.preprocess`` and running the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

RECIPE = """
task: regression
model:
  backbone: prithvi_eo_tiny
  backbone_pretrained: false
  backbone_img_size: 32
  backbone_bands: [RED, GREEN, BLUE]
  necks: [{name: SelectIndices, indices: [1, 3]}, {name: ReshapeTokensToImage}]
  decoder: FCNDecoder
  decoder_channels: 16
data:
  train: {tiles: TILES}
  dataset_bands: [COASTAL, BLUE, GREEN, RED, NIR]   # the files' 5 bands; the model takes 3 of them, reordered
  bands: [RED, GREEN, BLUE]
  constant_scale: 0.0001
  means: [0.1, 0.2, 0.3]
  stds: [0.05, 0.06, 0.07]
  no_data_replace: 0
  img_size: 32
  global_batch_size: 2
train: {max_steps: 2, precision: fp32}
"""


def _export(tmp_path: Path) -> Path:
    """An export folder as ``export_run`` writes it: the model block and ``inference_data`` of the recipe."""
    import torch
    from safetensors.torch import save_file

    from encdec.launcher.commands.export_cmd import inference_data
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.train.build import build_run_model

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("TILES", str(tmp_path / "tiles")))
    recipe = load_recipe(path)
    torch.manual_seed(0)
    net = build_run_model(recipe.task, recipe.model, recipe.train)
    out = tmp_path / "export"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    doc = {"task": recipe.task, "model": recipe.model.factory_kwargs(), "data": inference_data(recipe)}
    (out / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


@pytest.mark.parametrize("size", [32, 80])  # one window (the whole scene), and tiled windows
def test_predict_applies_the_training_preprocessing(tmp_path: Path, size: int) -> None:
    import torch

    import encdec
    from encdec.data.preprocess import preprocess
    from encdec.launcher.commands.predict_cmd import resolve_model, tiled_from
    from tests.unit._predict_models import write_scene

    export = _export(tmp_path)
    spec = resolve_model(str(export))
    assert spec.data is not None and spec.data.constant_scale == 1e-4
    assert spec.data.dataset_bands == ["COASTAL", "BLUE", "GREEN", "RED", "NIR"]
    rng = np.random.default_rng(1)
    pixels = rng.integers(500, 3000, size=(5, size, size)).astype(np.uint16)
    pixels[:, 3:5, 7:9] = 0  # nodata pixels: replaced by no_data_replace in the input, nodata in the map
    scene = write_scene(tmp_path / "scene.tif", pixels, nodata=0)
    tiled = tiled_from(spec, ["tiled.stride=24", "tiled.delta=0"], None) if size > 32 else tiled_from(spec, [], None)
    res = encdec.predict(spec, [str(scene)], tmp_path / "out", task="regression", tiled=tiled, data=spec.data,
                         quicklook=False)
    assert not res.failed
    with rasterio.open(res.outputs[str(scene)]["pred"]) as src:
        got = src.read(1)

    x, valid = preprocess(pixels, spec.data, nodata=0, path=str(scene))
    assert x.shape == (3, size, size) and not valid[3:5, 7:9].any()
    # the expected input, spelled out: RED, GREEN, BLUE = file bands 4, 3, 2; nodata -> 0 before scaling
    raw = pixels[[3, 2, 1]].astype(np.float32)
    raw[:, ~valid] = 0
    ref = (raw * 1e-4 - np.array([0.1, 0.2, 0.3], np.float32)[:, None, None]) / \
        np.array([0.05, 0.06, 0.07], np.float32)[:, None, None]
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)
    net = spec().eval()
    with torch.no_grad():
        if size == 32:
            want = net(torch.from_numpy(x)[None]).output[0].numpy()
            want = want[0] if want.ndim == 3 else want
            np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-4)
        else:  # the first window (rows/cols 0..31) is not blended with another in its top-left 24 x 24
            want = net(torch.from_numpy(np.ascontiguousarray(x[:, :32, :32]))[None]).output[0].numpy()
            want = want[0] if want.ndim == 3 else want
            np.testing.assert_allclose(got[:24, :24][valid[:24, :24]], want[:24, :24][valid[:24, :24]],
                                       rtol=1e-4, atol=1e-4)
    assert np.isnan(got[3:5, 7:9]).all()
