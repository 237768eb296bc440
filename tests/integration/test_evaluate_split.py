"""``encdec-launch evaluate MODEL --split val|test``: a tiny export on its recipe's synthetic tiles, as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

SCRIPT = Path(sys.executable).parent / "encdec-launch"
REPO = Path(__file__).resolve().parents[2]
RECIPE = """
task: segmentation
model:
  backbone: prithvi_eo_tiny
  backbone_pretrained: false
  backbone_img_size: 32
  backbone_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
  necks: [{name: SelectIndices, indices: [1, 3]}, {name: ReshapeTokensToImage}]
  decoder: FCNDecoder
  decoder_channels: 16
  num_classes: 2
data:
  train: {tiles: ROOT/train, synthetic: {n_tiles: 4, seed: 0}}
  val: {tiles: ROOT/val}
  bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
  img_size: 32
  global_batch_size: 2
train: {max_steps: 2, precision: fp32}
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)


def test_evaluate_split_writes_the_engine_metrics(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from encdec.data.synthetic import write_tiles
    from encdec.launcher.commands.export_cmd import inference_data
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.train.build import build_run_model

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(RECIPE.replace("ROOT", str(tmp_path / "tiles")))
    recipe = load_recipe(run / "recipe.yaml")
    write_tiles(tmp_path / "tiles" / "val", 3, img_size=32, seed=1)  # what training wrote (data.val.synthetic)
    torch.manual_seed(0)
    net = build_run_model(recipe.task, recipe.model, recipe.train)
    export = run / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(export / "model.safetensors"))
    doc = {"task": recipe.task, "model": recipe.model.factory_kwargs(), "data": inference_data(recipe)}
    (export / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    out = _cli("evaluate", str(export), "--split", "val", "-o", str(tmp_path / "ev"))
    assert out.returncode == 0, out.stdout + out.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    cm = np.asarray(m["confusion_matrix"])
    assert m["split"] == "val" and cm.shape == (2, 2) and 0 < m["pixels"] == cm.sum() <= 3 * 32 * 32
    assert abs(m["accuracy"] - np.trace(cm) / cm.sum()) < 1e-12
    assert set(m["per_class"]) == {"0", "1"} and set(m["per_class"]["0"]) >= {"iou", "f1", "precision", "recall"}
    for name in ("metrics.csv", "confusion_matrix.csv", "confusion_matrix.png"):
        assert (tmp_path / "ev" / name).exists()

    missing = _cli("evaluate", str(export), "--split", "test", "-o", str(tmp_path / "ev2"))
    assert missing.returncode != 0 and "data.test" in missing.stderr + missing.stdout
