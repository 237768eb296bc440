"""``encdec-launch predict MODEL SCENES... -o OUT`` and ``encdec-launch evaluate``: the CLI over ``encdec.predict``.

MODEL is a run directory (its ``recipe.yaml`` + a checkpoint: ``--checkpoint best|last|PATH``) or an export folder
(``model.yaml`` + ``model.safetensors``; its ``data:`` block, else the recipe of the run it came from,
``../recipe.yaml``, gives the data settings). Scenes are preprocessed exactly as training tiles are
(``encdec.data.preprocess`` with the ``data:`` section: bands by name incl. ``dataset_bands``, ``constant_scale``,
means/stds, ``no_data_replace``); ``img_size`` is the window; the recipe's precision is used. ``--set tiled.KEY=VALUE`` sets TerraTorch's tiled-inference parameters; other ``--set`` keys override
the recipe as for training.

The model is built by :func:`load_run_model` (run directories: ``export_cmd.restore``, i.e. ``build_run_model`` +
the checkpoint). This module imports neither torch nor ray at import time (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encdec.config import DataSection
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["ModelSpec", "add_parsers", "evaluate_command", "load_run_model", "predict_command", "resolve_model"]


@dataclass(frozen=True)
class ModelSpec:
    """A MODEL argument resolved: how to build the model (picklable: each Ray worker loads it) and the data
    settings predict needs (``data``: the ``data:`` section training preprocessed its tiles with)."""

    kind: str  # "run" or "export"
    path: Path
    checkpoint: str | None
    task: str
    model_block: dict[str, Any]
    recipe_path: Path | None
    overrides: tuple[str, ...] = ()
    data: DataSection | None = None
    img_size: int = 224
    precision: str = "fp32"
    class_names: tuple[str, ...] | None = None
    name: str = field(default="")

    def __call__(self) -> Any:
        return load_run_model(self)


def load_run_model(spec: ModelSpec) -> Any:
    """Build the model with its trained weights, in this process: a run directory as ``export`` restores it
    (``build_run_model`` with real adapters + the checkpoint), an export folder as its ``model.yaml`` says
    (``build_model(task, **model)`` + ``model.safetensors``, strict)."""
    from encdec.models import build_model

    if spec.kind == "export":
        from safetensors.torch import load_file

        net = build_model(spec.task, **spec.model_block)
        net.load_state_dict(load_file(str(spec.path / "model.safetensors")), strict=True)
        return net
    from encdec.launcher.commands.export_cmd import pick_checkpoint, restore
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.launcher.rundir import latest_checkpoint

    assert spec.recipe_path is not None
    recipe = load_recipe(spec.recipe_path, spec.overrides)
    if spec.checkpoint in (None, "best"):
        ckpt: Path | None = pick_checkpoint(spec.path, recipe)
    elif spec.checkpoint == "last":
        ckpt = latest_checkpoint(spec.path)
    else:
        ckpt = Path(spec.checkpoint)
    if ckpt is None:
        raise LaunchError(f"{spec.path} has no complete checkpoint (--checkpoint last). Fix: train first.")
    return restore(spec.path, recipe, ckpt)


def export_data_section(block: dict[str, Any], where: Path) -> DataSection:
    """An export's ``data:`` block (``model.yaml``) as the section ``encdec.data.preprocess`` takes.

    The section needs a training source to validate; an export has none, and predict never reads one: the export
    folder stands in (nothing is read from it as tiles).
    """
    from pydantic import ValidationError

    try:
        return DataSection.model_validate({**block, "train": {"tiles": str(where)}, "global_batch_size": 1})
    except ValidationError as e:
        raise LaunchError(f"{where / 'model.yaml'}: its data: block is invalid ({e}). Fix: re-export the run with "
                          f"`encdec-launch export RUN_DIR`.") from e


def resolve_model(model: str, *, checkpoint: str | None = None, overrides: tuple[str, ...] = ()) -> ModelSpec:
    """Read a MODEL argument's recipe/model.yaml (no weights) into a :class:`ModelSpec`."""
    import yaml

    path = Path(model).resolve()
    recipe_path: Path | None
    if (path / "recipe.yaml").is_file():
        kind, recipe_path = "run", path / "recipe.yaml"
    elif (path / "model.yaml").is_file() and (path / "model.safetensors").is_file():
        kind = "export"
        recipe_path = path.parent / "recipe.yaml" if (path.parent / "recipe.yaml").is_file() else None
    else:
        raise LaunchError(f"MODEL={model!r} is neither a run directory (recipe.yaml + checkpoints/) nor an export "
                          f"folder (model.yaml + model.safetensors). Fix: pass runs/<name> or runs/<name>/export "
                          f"(`encdec-launch export RUN_DIR` writes one).")
    tiled_free = tuple(o for o in overrides if not o.startswith("tiled."))
    data: DataSection | None = None
    task, block, precision = "segmentation", {}, "fp32"
    names: list[str] | None = None
    if recipe_path is not None:
        from encdec.launcher.recipe.validate import load_recipe

        recipe = load_recipe(recipe_path, tiled_free)
        task, block, data = recipe.task, recipe.model.factory_kwargs(), recipe.data
        precision = recipe.train.precision
    if kind == "export":
        doc = yaml.safe_load((path / "model.yaml").read_text())
        task, block = doc["task"], doc["model"]
        if doc.get("data"):  # what the export says wins: the weights were trained with it
            data = export_data_section(doc["data"], path)
        names = doc.get("class_names")
    if task not in ("segmentation", "regression"):
        raise LaunchError(f"task={task!r}: predict writes maps for pixel-wise tasks (allowed: segmentation, "
                          f"regression). Fix: evaluate classification models on their test split.")
    return ModelSpec(kind, path, checkpoint, task, block, recipe_path, tiled_free, data=data,
                     img_size=data.img_size if data else 224, precision=str(precision),
                     class_names=tuple(names) if names else None, name=path.name)


def tiled_from(spec: ModelSpec, overrides: list[str], batch_size: int | None) -> Any:
    """TerraTorch's defaults scaled to the model's window: crop = img_size, stride = 7/8 of it, delta <= 8."""
    from encdec.launcher.recipe.overrides import parse_override
    from encdec.predict.windows import TiledParams

    crop = spec.img_size
    delta = min(8, crop // 16)
    values: dict[str, Any] = {"crop": crop, "stride": crop - max(2 * delta, crop // 8), "delta": delta}
    if batch_size:
        values["batch_size"] = batch_size
    for text in overrides:
        if text.startswith("tiled."):
            path, value = parse_override(text)
            values[str(path[1])] = value
    try:
        return TiledParams(**values)
    except ValueError as e:
        raise LaunchError(f"--set tiled.*: {e}") from e


def _precision(name: str) -> str:
    if name in ("bf16", "fp16", "fp32"):
        return name
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _connect(args: argparse.Namespace) -> Any:
    """A local Ray cluster (as for training) unless ``--address``; ``ray.init`` to it. Returns the cluster."""
    from encdec.launcher.ray.ray_auth import auth_env

    auth_env()
    import ray

    from encdec.launcher.ray.ray_cluster import LocalRayCluster

    cluster = None
    address = args.address
    if not address:
        cluster = LocalRayCluster(num_nodes=max(1, args.nodes or 1)).start()
        address = cluster.gcs_address
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    except BaseException:
        if cluster is not None:
            cluster.stop()
        raise
    return cluster


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _dry_run(spec: ModelSpec, args: argparse.Namespace, tiled: Any, out_spec: Any) -> int:
    from encdec.predict.api import plan_predict, worker_memory_bytes

    plans, bad = plan_predict(args.scenes, args.output, tiled=tiled, spec=out_spec, strip_rows=args.strip_rows)
    k = 1 if spec.task == "regression" else int(spec.model_block.get("num_classes", 2))
    t = tiled.resolve()
    print(f"model {spec.path} ({spec.kind}, task {spec.task}, {k} output channels); tiled: crop {t.h_crop}x"
          f"{t.w_crop}, stride {t.h_stride}x{t.w_stride}, delta {t.delta}, batch {t.batch_size}")
    print(f"{'scene':<32} {'size':>13} {'windows':>8} {'strips':>6} {'outputs':>12} {'worker mem':>12}  state")
    for sp in plans:
        mem = worker_memory_bytes(sp, k, queue_windows=args.queue_windows)
        print(f"{sp.scene.name[:32]:<32} {sp.scene.height:>6}x{sp.scene.width:<6} {sp.plan.n_windows:>8} "
              f"{len(sp.plan.strips):>6} {_mb(sp.output_bytes(k, out_spec)):>12} {_mb(mem):>12}  "
              f"{'done (skipped)' if sp.done and not args.overwrite else 'to do'}")
    print("worker mem: input rows, window queue, batch, accumulator and output rows; add the model and torch "
          "runtime (see `encdec-launch plan`).")
    for path, why in bad.items():
        print(f"skipped {path}: {why}")
    return 0 if plans else 3


def predict_command(args: argparse.Namespace) -> int:
    """CLI body of ``encdec-launch predict``."""
    from encdec.predict.outputs import OutputSpec

    spec = resolve_model(args.model, checkpoint=args.checkpoint, overrides=tuple(args.overrides))
    tiled = tiled_from(spec, args.overrides, args.batch_size)
    out_spec = OutputSpec(task=spec.task, class_names=spec.class_names,  # type: ignore[arg-type]
                          probabilities=args.probabilities, quicklook=not args.no_quicklook)
    if args.dry_run:
        return _dry_run(spec, args, tiled, out_spec)
    from encdec.predict.api import predict

    workers = args.workers or (args.nodes or 1)
    cluster = _connect(args) if workers > 1 or args.address else None
    try:
        res = predict(spec, args.scenes, args.output, task=spec.task, tiled=tiled, data=spec.data,  # type: ignore[arg-type]
                      class_names=spec.class_names, probabilities=args.probabilities, overwrite=args.overwrite,
                      precision=_precision(spec.precision), device=args.device, workers=workers,  # type: ignore[arg-type]
                      cpus_per_worker=args.cpus_per_worker, strip_rows=args.strip_rows,
                      queue_windows=args.queue_windows, quicklook=not args.no_quicklook,
                      tags={"model": str(spec.path), "recipe_sha256": _recipe_hash(spec)}, progress=True)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.stop()
    for scene, outs in res.outputs.items():
        note = " (already done)" if scene in res.skipped_done else ""
        print(f"{scene} -> {', '.join(str(p) for p in outs.values())}{note}")
    for scene, why in res.failed.items():
        print(f"FAILED {scene}: {why}", file=sys.stderr)
    print(f"{len(res.outputs)} scene(s) written or done, {len(res.failed)} failed; {res.windows} windows in "
          f"{res.seconds:.1f} s ({res.windows_per_s:.1f} windows/s)")
    return 0 if not res.failed else 4


def _recipe_hash(spec: ModelSpec) -> str:
    import hashlib

    src = spec.recipe_path or (spec.path / "model.yaml")
    return hashlib.sha256(src.read_bytes()).hexdigest()[:16]


def evaluate_command(args: argparse.Namespace) -> int:
    """CLI body of ``encdec-launch evaluate``: predict scenes, then compare with reference rasters."""
    from encdec.predict.evaluate import evaluate_scenes

    if args.split:
        from encdec.launcher.commands.evaluate_split import evaluate_split

        if args.scenes or args.references:
            raise LaunchError("--split evaluates the recipe's tiles; --scenes/--references evaluate whole scenes. "
                              "Fix: give one or the other.")
        spec = resolve_model(args.model, checkpoint=args.checkpoint, overrides=tuple(args.overrides))
        out = Path(args.output or Path(args.model) / f"evaluate_{args.split}")
        result = evaluate_split(spec, args.split, out)
        print(json.dumps({k: v for k, v in result.items() if k not in ("confusion_matrix", "per_class")}, indent=1))
        print(f"wrote {out / 'metrics.json'} and {out / 'metrics.csv'}")
        return 0
    if not args.scenes or not args.references or len(args.scenes) != len(args.references):
        raise LaunchError(f"--scenes ({len(args.scenes or [])}) and --references ({len(args.references or [])}) "
                          f"must pair one reference raster per scene. Fix: give both lists in the same order.")
    args.output = args.output or str(Path(args.model) / "evaluate")
    args.dry_run, args.no_quicklook = False, False
    code = predict_command(args)
    if code not in (0, 4):
        return code
    spec = resolve_model(args.model, checkpoint=args.checkpoint, overrides=tuple(args.overrides))
    from encdec.predict.scenes import scene_name

    preds = [str(Path(args.output) / f"{scene_name(s)}.tif") for s in args.scenes]
    metrics = evaluate_scenes(preds, args.references, Path(args.output), task=spec.task,
                              num_classes=int(spec.model_block.get("num_classes", 2)),
                              class_names=spec.class_names, ignore_index=args.ignore_index)
    print(json.dumps({k: v for k, v in metrics.items() if k != "confusion_matrix"}, indent=1))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``predict`` and ``evaluate`` subcommands."""
    for name in ("predict", "evaluate"):
        if name == "predict":
            p = sub.add_parser("predict", help="tiled inference of a trained model on scenes of any size -> COGs")
            p.add_argument("model", metavar="MODEL", help="run directory or export folder")
            p.add_argument("scenes", nargs="+", metavar="SCENES",
                           help="GeoTIFF/COG files, folders, globs, manifests (.txt/.csv), /vsicurl/, /vsis3/, s3://")
            p.add_argument("-o", "--output", required=True, help="output folder")
            p.add_argument("--dry-run", action="store_true",
                           help="list scenes, windows, output sizes and memory per worker; build nothing")
        else:
            p = sub.add_parser("evaluate", help="metrics of a model on whole scenes against reference rasters")
            p.add_argument("model", metavar="MODEL", help="run directory or export folder")
            p.add_argument("--split", choices=["test", "val"],
                           help="evaluate the recipe's data.test/data.val tiles (instead of --scenes/--references)")
            p.add_argument("--scenes", nargs="+", help="scenes to predict")
            p.add_argument("--references", nargs="+", help="reference rasters, one per scene, same grid")
            p.add_argument("-o", "--output", help="output folder (default MODEL/evaluate)")
            p.add_argument("--ignore-index", type=int, default=None, help="reference value to ignore")
        p.add_argument("--checkpoint", help="best (default), last, or a checkpoint path (run directories)")
        p.add_argument("--probabilities", nargs="?", const="uint8", choices=["uint8", "float16"],
                       help="also write per-class probabilities (uint8 x254 by default, or float16 values)")
        p.add_argument("--overwrite", action="store_true", help="redo scenes whose outputs exist")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="tiled.crop/stride/delta/average_patches/blend_overlaps/batch_size, or a recipe key")
        p.add_argument("--batch-size", type=int, help="windows per forward pass (tiled.batch_size)")
        p.add_argument("--nodes", type=int, help="local Ray nodes to start (one worker each unless --workers)")
        p.add_argument("--workers", type=int, help="Ray workers (default: --nodes, else 1 in this process)")
        p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs and torch threads per worker")
        p.add_argument("--address", help="an existing Ray cluster (GCS address) instead of a local one")
        p.add_argument("--device", help="torch device (default: cuda when available)")
        p.add_argument("--strip-rows", type=int, default=2048, help="output rows per unit of work (resume unit)")
        p.add_argument("--queue-windows", type=int, default=32, help="windows read ahead per worker")
        p.add_argument("--no-quicklook", action="store_true", help="skip the PNG quicklooks")
