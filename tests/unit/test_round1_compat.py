"""Run directories written by the round-1 code (commit 00ab3bc) still resume and export with this code.

``fixtures/round1_run/`` was made by ``fixtures/make_round1_run.py`` at that commit: ``lora`` (tiny Prithvi +
LoRA, adapter-only DCP checkpoints) and ``full`` (a small timm ConvNeXt + FCN, full DCP checkpoint). Their
checkpoints carry no best record in ``extra`` (this code keeps one there): the best comes from the run's
``best.json`` once, on resume. The tiles are written again here (same synthetic set), and the recipes pointed at
them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

FIXTURE = Path(__file__).parent / "fixtures" / "round1_run"
TILES = {"train": (8, 0), "val": (4, 1)}  # as make_round1_run.py wrote them: split -> (n_tiles, seed)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from encdec.data.synthetic import write_tiles

    root = tmp_path_factory.mktemp("round1_tiles")
    return {split: write_tiles(root / split, n, img_size=32, seed=seed) for split, (n, seed) in TILES.items()}


def _copy_run(name: str, tiles: dict[str, Path], dest: Path, **train: Any) -> Path:
    """A copy of a round-1 run directory whose recipe reads this machine's tiles (and ``train`` overrides)."""
    run_dir = dest / name
    shutil.copytree(FIXTURE / name, run_dir)
    recipe_file = run_dir / "recipe.yaml"
    doc = yaml.safe_load(recipe_file.read_text())
    for split, path in tiles.items():
        doc["data"][split]["tiles"] = str(path)
    doc["train"].update(train)
    recipe_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    return run_dir


@pytest.mark.parametrize("name", ["lora", "full"])
def test_round1_run_resumes(name: str, tiles: dict[str, Path], tmp_path: Path) -> None:
    from encdec.launcher.ray.driver import train_config
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.train.loop import train

    run_dir = _copy_run(name, tiles, tmp_path, max_steps=6)
    round1_best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    meta = json.loads((run_dir / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["adapter_only"] is (name == "lora"), "the fixture covers one adapter-only and one full checkpoint"
    config = train_config(load_recipe(run_dir / "recipe.yaml"), run_dir, None)
    config.pop("sink")
    steps: set[int] = set()
    final = train(**config, resume=str(run_dir),
                  report=lambda metrics, ckpt: steps.add(int(metrics["step"])) if "train/loss" in metrics else None)
    assert sorted(steps) == [5, 6], "resumes after the round-1 checkpoint at step 4"
    assert final["step"] == 6 and Path(final["checkpoint"]).name == "step_00000006"
    # the round-1 best (from its best.json, broadcast once) is the record to beat, not forgotten
    best = final["best"]
    assert best["metric"] == round1_best["metric"]
    if best["step"] == round1_best["step"]:
        assert best == round1_best
    else:
        assert best["step"] == 6 and best["value"] > round1_best["value"]
    assert json.loads((run_dir / "checkpoints" / "best.json").read_text()) == best


@pytest.mark.parametrize("name", ["lora", "full"])
def test_round1_run_exports(name: str, tiles: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from encdec.launcher.commands.export_cmd import export_run

    run_dir = _copy_run(name, tiles, tmp_path)
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["data"]["class_names"] = ["land", "water"]  # issue 17: model.yaml carries what inference needs
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = export_run(run_dir)  # the best checkpoint (step 2); checks the strict load into the plain model itself
    state = load_file(str(out))
    assert state and not any("lora_" in k or "q_linear" in k for k in state)
    doc = yaml.safe_load((out.parent / "model.yaml").read_text())
    assert "peft_config" not in doc["model"]
    data = doc["data"]
    assert data["bands"] == recipe["data"]["bands"] and len(data["means"]) == len(data["stds"]) == len(data["bands"])
    assert (data["constant_scale"], data["img_size"], data["num_frames"]) == (1.0, recipe["data"]["img_size"], 1)
    assert doc["class_names"] == ["land", "water"]
    from encdec.launcher.commands.predict_cmd import resolve_model

    (run_dir / "recipe.yaml").unlink()  # predict needs nothing but the export folder
    spec = resolve_model(str(out.parent))
    assert spec.class_names == ("land", "water") and spec.data is not None and spec.data.means == data["means"]


def test_class_names_must_match_num_classes(tmp_path: Path) -> None:
    from encdec.launcher.recipe.errors import RecipeError
    from encdec.launcher.recipe.validate import load_recipe

    doc = yaml.safe_load((FIXTURE / "full" / "recipe.yaml").read_text())
    doc["data"]["class_names"] = ["land", "water", "cloud"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(RecipeError, match=r"data\.class_names.*3 names but model\.num_classes is 2"):
        load_recipe(path)
    doc["data"]["class_names"] = ["land", 7]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(RecipeError, match=r"data\.class_names"):
        load_recipe(path)
