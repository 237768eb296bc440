"""``encdec-launch evaluate MODEL``: metrics of a model on whole scenes against reference rasters (predicted as
``predict`` does, references checked first), or on its recipe's ``--split`` tiles (``evaluate_split``). MODEL is
resolved as for predict (:func:`~encdec.launcher.commands.predict_cmd.resolve_model`); the command runs here or as a
job, as predict does. Imports neither torch nor ray at import time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from encdec.launcher.commands.predict_cmd import (
    ModelSpec,
    gdal_options,
    on_target,
    predict_here,
    resolve_model,
    user_errors,
)
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["evaluate_command"]


def evaluate_command(args: argparse.Namespace) -> int:
    """CLI body of ``encdec-launch evaluate``: predict scenes, then compare with reference rasters; or the recipe's
    ``--split`` tiles. Here, or as a job on Slurm, Kubernetes or a Ray Job."""
    if args.split and (args.scenes or args.references):
        raise LaunchError("--split evaluates the recipe's tiles; --scenes/--references evaluate whole scenes. "
                          "Fix: give one or the other.")
    if not args.split and (not args.scenes or not args.references or len(args.scenes) != len(args.references)):
        raise LaunchError(f"--scenes ({len(args.scenes or [])}) and --references ({len(args.references or [])}) "
                          f"must pair one reference raster per scene. Fix: give both lists in the same order.")
    spec = resolve_model(args.model, checkpoint=args.checkpoint, overrides=tuple(args.overrides), config=args.config)
    if not args.split and spec.task not in ("segmentation", "regression"):
        raise LaunchError(f"task={spec.task!r}: --scenes/--references compares maps with reference rasters; a "
                          f"{spec.task} model gives one value per window. Fix: evaluate it with --split test|val.")
    args.output = args.output or str(Path(args.model) / (f"evaluate_{args.split}" if args.split else "evaluate"))
    here = (lambda: _evaluate_split_here(args, spec)) if args.split else (lambda: _evaluate_scenes_here(args, spec))
    with user_errors():
        return on_target("evaluate", args, spec, here, needs_ray_address=not args.split)  # --split runs no Ray


def _evaluate_split_here(args: argparse.Namespace, spec: ModelSpec) -> int:
    from encdec.launcher.commands.evaluate_split import evaluate_split, split_samples

    if args.dry_run:
        samples, task = split_samples(spec, args.split)
        print(f"model {spec.path} ({spec.kind}, task {task}); --split {args.split}: {len(samples)} samples "
              f"(first {samples[0].images[0] if samples else '-'}); metrics -> {args.output}")
        return 0
    out = Path(args.output)
    result = evaluate_split(spec, args.split, out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("confusion_matrix", "per_class")}, indent=1))
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.csv'}")
    return 0


def _evaluate_scenes_here(args: argparse.Namespace, spec: ModelSpec) -> int:
    from encdec.predict.evaluate import check_references, evaluate_scenes
    from encdec.predict.scenes import scene_name

    lines = check_references(args.scenes, args.references, gdal_options(args.gdal))  # before hours of predicting
    if args.dry_run:
        code = predict_here(args, spec)  # the predict plan: windows, sizes, memory per worker
        print("references on their scenes' grids:\n  " + "\n  ".join(lines))
        return code
    args.no_quicklook = False
    code = predict_here(args, spec)
    if code not in (0, 4):
        return code

    preds = [str(Path(args.output) / f"{scene_name(s)}.tif") for s in args.scenes]
    metrics = evaluate_scenes(preds, args.references, Path(args.output), task=spec.task,
                              num_classes=int(spec.model_block.get("num_classes", 2)),
                              class_names=spec.class_names, ignore_index=args.ignore_index)
    print(json.dumps({k: v for k, v in metrics.items() if k != "confusion_matrix"}, indent=1))
    return 0
