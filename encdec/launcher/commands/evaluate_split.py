"""``encdec-launch evaluate MODEL --split test|val``: the model on a split of its recipe's tiles, in this process.

Batches come from the training data pipeline (``build_iterator``: the same reading and preprocessing as training,
one ordered pass); counts from the engine's metrics (``encdec.train.metrics``); the per-class table (IoU, F1,
precision, recall) from the confusion matrix by ``encdec.predict.evaluate.confusion_metrics``, as for scenes.
Writes ``metrics.json`` and ``metrics.csv`` (+ ``confusion_matrix.csv/png`` for segmentation) under ``out_dir``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from encdec.launcher.recipe.errors import LaunchError

__all__ = ["evaluate_split"]


def split_samples(spec: Any, split: str) -> tuple[list[Any], str]:
    """The ordered samples of the recipe's ``split`` and the task (``--dry-run``: no model, no pixels read)."""
    from encdec.data.sources import list_samples

    recipe = _recipe_with_split(spec, split)
    source = recipe.data.split(split)
    return list_samples(source, img_size=recipe.data.img_size, where=f"data.{split}", split=split), recipe.task


def _recipe_with_split(spec: Any, split: str) -> Any:
    from encdec.launcher.recipe.validate import load_recipe

    if spec.recipe_path is None:
        raise LaunchError(f"{spec.path}: --split needs the recipe of the run (recipe.yaml beside the export "
                          f"folder). Fix: evaluate the run directory, or pass --scenes/--references.")
    recipe = load_recipe(spec.recipe_path, spec.overrides)
    if recipe.data.split(split) is None:
        raise LaunchError(f"--split {split}: the recipe {spec.recipe_path} has no data.{split}. Fix: add "
                          f"data.{split}: {{tiles: ...}} (`--set data.{split}.tiles=PATH`), or use another split.")
    return recipe


def evaluate_split(spec: Any, split: str, out_dir: Path) -> dict[str, Any]:
    """Evaluate ``spec`` (a resolved MODEL, ``predict_cmd.ModelSpec``) on the recipe's ``split`` tiles."""
    import torch

    from encdec.data.build import build_iterator
    from encdec.predict.evaluate import _f, _write_segmentation, confusion_metrics
    from encdec.train.losses import build_loss, target_of
    from encdec.train.metrics import build_metrics

    recipe = _recipe_with_split(spec, split)
    loss_fn = build_loss(recipe.task, recipe.loss)
    num_classes = recipe.model.num_classes
    metrics = build_metrics(recipe.task, num_classes=num_classes, ignore_index=loss_fn.ignore_index)
    net = spec().eval()
    batches = build_iterator(recipe.data, split=split, rank=0, world_size=1, grad_accum=1, seed=recipe.run.seed)
    with torch.inference_mode():
        for batch in batches:
            out = net(batch["image"])
            metrics.update(out.output.float(), target_of(recipe.task, batch), valid=loss_fn.valid_mask(batch))
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.task in ("segmentation", "classification"):  # both count one confusion matrix
        result = confusion_metrics(metrics.confusion.numpy(), spec.class_names)
        _write_segmentation(out_dir, result)
    else:  # rmse, mae, r2 from the engine's all-reduced sums; NaN (no valid target) as null in the JSON
        result = {k: _f(v) for k, v in metrics.compute().items()}
        with (out_dir / "metrics.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["metric", "value"], *[[k, v] for k, v in result.items()]])
    result["split"] = split
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return result
