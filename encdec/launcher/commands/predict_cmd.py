"""``encdec-launch predict MODEL SCENES... -o OUT``: the CLI over ``encdec.predict``; what MODEL means and where a
command runs, which ``evaluate`` (``evaluate_cmd``) shares, and both commands' flags.

MODEL is a run directory (its ``recipe.yaml`` + a checkpoint: ``--checkpoint best|last|PATH``), an export folder
(``model.yaml`` + ``model.safetensors``; its ``data:`` block, else the recipe of the run it came from,
``../recipe.yaml``, gives the data settings), or a TerraTorch run: ``TT.ckpt --config TT.yaml`` (or
``TT.yaml --checkpoint TT.ckpt``), mapped by ``convert-terratorch`` and loaded by ``encdec.models.terratorch_ckpt``
(no code from the checkpoint runs). Scenes are preprocessed exactly as training tiles are
(``encdec.data.preprocess`` with the ``data:`` section: bands by name incl. ``dataset_bands``, ``constant_scale``,
means/stds, ``no_data_replace``); ``img_size`` is the window; the recipe's precision is used. ``--set tiled.KEY=VALUE`` sets TerraTorch's tiled-inference parameters; other ``--set`` keys override
the recipe as for training.

The model is built by :func:`load_run_model` (run directories: ``export_cmd.restore``, i.e. ``build_run_model`` +
the checkpoint). This module imports neither torch nor ray at import time (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from encdec.config import DataSection
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["ModelSpec", "add_parsers", "gdal_options", "load_run_model", "on_target", "predict_command", "predict_here",
           "resolve_model", "user_errors"]


@dataclass(frozen=True)
class ModelSpec:
    """A MODEL argument resolved: how to build the model (picklable: each Ray worker loads it) and the data
    settings predict needs (``data``: the ``data:`` section training preprocessed its tiles with)."""

    kind: str  # "run", "export" or "terratorch"
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
    config_path: Path | None = None  # a TerraTorch run's LightningCLI config

    def __call__(self) -> Any:
        return load_run_model(self)


def load_run_model(spec: ModelSpec) -> Any:
    """Build the model with its trained weights, in this process: a run directory as ``export`` restores it
    (``build_run_model`` with real adapters + the checkpoint), an export folder as its ``model.yaml`` says
    (``build_model(task, **model)`` + ``model.safetensors``, strict)."""
    from encdec.models import build_model

    if spec.kind == "terratorch":
        from encdec.models.terratorch_ckpt import load_terratorch_weights, read_checkpoint

        assert spec.checkpoint is not None
        # every weight comes from the checkpoint: never fetch the backbone's pretrained weights first
        net = build_model(spec.task, **{**spec.model_block, "backbone_pretrained": False})
        load_terratorch_weights(net, read_checkpoint(spec.checkpoint), strict=True)
        return net
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


def resolve_terratorch(model: str, *, checkpoint: str | None, config: str | None) -> ModelSpec:
    """A TerraTorch run as MODEL: its LightningCLI config mapped by ``convert-terratorch`` (task, ``model_args``,
    the data module's bands/means/stds/img_size) and its Lightning checkpoint (read by :func:`load_run_model`)."""
    import yaml

    from encdec.launcher.commands.convert_terratorch import convert
    from encdec.launcher.recipe.errors import RecipeError
    from encdec.launcher.recipe.validate import recipe_from_dict

    ckpt, cfg = (model, config) if config else (checkpoint, model)
    if not cfg or not Path(cfg).is_file() or not ckpt or not Path(ckpt).is_file():
        raise LaunchError(f"a TerraTorch MODEL needs its checkpoint and its config: got checkpoint {ckpt!r}, config "
                          f"{cfg!r}. Fix: `predict RUN.ckpt --config CONFIG.yaml ...` (or `predict CONFIG.yaml "
                          f"--checkpoint RUN.ckpt ...`), both existing files.")
    try:
        doc = yaml.safe_load(Path(cfg).read_text()) or {}
    except yaml.YAMLError as e:
        raise LaunchError(f"{cfg}: not a YAML TerraTorch config ({e}). Fix: pass the config the run was trained "
                          f"with (LightningCLI YAML).") from e
    recipe_doc, _, unmapped = convert(doc)
    # predict reads no tiles, so only what cannot be mapped of the model itself stops it
    model_unmapped = [u for u in unmapped if u.startswith("model.")]
    if model_unmapped:
        raise LaunchError(f"{cfg}: the TerraTorch model cannot be mapped: " + "; ".join(model_unmapped))
    data = dict(recipe_doc.get("data") or {})
    for split in ("val", "test"):  # predict reads no tiles: the data module's roots need not exist here
        data.pop(split, None)
    data["train"] = {"tiles": str(Path(cfg).resolve().parent)}
    try:
        recipe = recipe_from_dict({**recipe_doc, "data": data}, source=str(cfg))
    except RecipeError as e:
        raise LaunchError(f"{cfg}: the TerraTorch config does not map to a model predict can build:\n{e}\nFix: "
                          f"check its model.init_args.model_args (`encdec-launch convert-terratorch {cfg}` shows "
                          f"the mapping).") from e
    path = Path(ckpt).resolve()
    return ModelSpec("terratorch", path, str(path), recipe.task, recipe.model.factory_kwargs(), None, data=recipe.data,
                     img_size=recipe.data.img_size, precision=str(recipe.train.precision), name=path.stem,
                     config_path=Path(cfg).resolve())


def _class_names(doc: dict[str, Any]) -> list[str] | None:
    """``class_names`` of a ``model.yaml``: top level, or in its data/model block (taken out of the block, which is
    the factory's / the data section's keyword arguments)."""
    names = doc.get("class_names")
    for block in ("data", "model"):
        if isinstance(doc.get(block), dict) and "class_names" in doc[block]:
            doc[block] = dict(doc[block])
            names = doc[block].pop("class_names") or names
    return [str(n) for n in names] if names else None


def resolve_model(model: str, *, checkpoint: str | None = None, overrides: tuple[str, ...] = (),
                  config: str | None = None) -> ModelSpec:
    """Read a MODEL argument's recipe/model.yaml/TerraTorch config (no weights) into a :class:`ModelSpec`."""

    path = Path(model).resolve()
    recipe_path: Path | None
    if config or (path.is_file() and path.suffix.lower() in (".yaml", ".yml")):
        return resolve_terratorch(model, checkpoint=checkpoint, config=config)
    if (path / "recipe.yaml").is_file():
        kind, recipe_path = "run", path / "recipe.yaml"
    elif (path / "model.yaml").is_file() and (path / "model.safetensors").is_file():
        kind = "export"
        recipe_path = path.parent / "recipe.yaml" if (path.parent / "recipe.yaml").is_file() else None
    else:
        raise LaunchError(f"MODEL={model!r} is neither a run directory (recipe.yaml + checkpoints/) nor an export "
                          f"folder (model.yaml + model.safetensors) nor a TerraTorch checkpoint with --config. Fix: "
                          f"pass runs/<name> or runs/<name>/export (`encdec-launch export RUN_DIR` writes one), or "
                          f"RUN.ckpt --config CONFIG.yaml.")
    tiled_free = tuple(o for o in overrides if not o.startswith("tiled."))
    data: DataSection | None = None
    task, block, precision = "segmentation", {}, "fp32"
    names: list[str] | None = None
    if recipe_path is not None:
        from encdec.launcher.recipe.validate import load_recipe

        recipe = load_recipe(recipe_path, tiled_free)
        task, block, data = recipe.task, recipe.model.factory_kwargs(), recipe.data
        precision = recipe.train.precision
        names = list(recipe.data.class_names) if recipe.data.class_names else None
    if kind == "export":
        from encdec.config.yaml_load import safe_load

        doc = safe_load((path / "model.yaml").read_text())  # plain data only; a key given twice is refused
        names = _class_names(doc) or names  # the export's names; else the run recipe's data.class_names
        task, block = doc["task"], doc["model"]
        if doc.get("data"):  # what the export says wins: the weights were trained with it
            data = export_data_section(doc["data"], path)
    if task not in ("segmentation", "regression", "classification", "scalar_regression"):
        raise LaunchError(f"task={task!r}: predict knows segmentation, regression (maps), classification and "
                          f"scalar_regression (tables). Fix: set task: to one of them.")
    return ModelSpec(kind, path, checkpoint, task, block, recipe_path, tiled_free, data=data,
                     img_size=data.img_size if data else 224, precision=str(precision),
                     class_names=tuple(names) if names else None, name=path.name)


def tiled_from(spec: ModelSpec, overrides: list[str], batch_size: int | None) -> Any:
    """TerraTorch's defaults scaled to the model's window: crop = img_size, stride = 7/8 of it, delta <= 8."""
    from encdec.launcher.recipe.overrides import parse_override
    from encdec.predict.scalar import SCALAR_TASKS
    from encdec.predict.windows import TiledParams

    crop = spec.img_size
    delta = min(8, crop // 16)
    values: dict[str, Any] = {"crop": crop, "stride": crop - max(2 * delta, crop // 8), "delta": delta}
    if spec.task in SCALAR_TASKS:  # one result per window: side by side, nothing blended or discarded
        values = {"crop": crop, "stride": crop, "delta": 0}
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
    from encdec.predict.scalar import SCALAR_TASKS, scalar_done, scalar_key, scalar_windows

    plans, bad = plan_predict(args.scenes, args.output, tiled=tiled, spec=out_spec, strip_rows=args.strip_rows,
                              num_frames=spec.data.num_frames if spec.data else None,
                              gdal_options=gdal_options(args.gdal))
    k = 1 if spec.task == "regression" else int(spec.model_block.get("num_classes", 2))
    t = tiled.resolve()
    scalar = spec.task in SCALAR_TASKS  # one row per window (no blending), a table per call, resumed per scene
    print(f"model {spec.path} ({spec.kind}, task {spec.task}, {k} output channels); tiled: crop {t.h_crop}x"
          f"{t.w_crop}, stride {t.h_stride}x{t.w_stride}, delta {t.delta}, batch {t.batch_size}")
    print(f"{'scene':<32} {'size':>13} {'windows':>8} {'strips':>6} {'outputs':>12} {'worker mem':>12}  state")
    for sp in plans:
        if scalar:
            sp = replace(sp, done=scalar_done(Path(args.output), sp.scene, scalar_key(spec.task, spec.class_names, t)))
        windows = len(scalar_windows(sp.scene.height, sp.scene.width, t)) if scalar else sp.plan.n_windows
        strips, outputs = ("-", "table rows") if scalar else (len(sp.plan.strips), _mb(sp.output_bytes(k, out_spec)))
        mem = worker_memory_bytes(sp, k, queue_windows=args.queue_windows)
        print(f"{sp.scene.name[:32]:<32} {sp.scene.height:>6}x{sp.scene.width:<6} {windows:>8} {strips:>6} "
              f"{outputs:>12} {_mb(mem):>12}  {'done (skipped)' if sp.done and not args.overwrite else 'to do'}")
    print("worker mem: input rows, window queue, batch, accumulator and output rows; add the model and torch "
          "runtime (see `encdec-launch plan`).")
    for path, why in bad.items():
        print(f"skipped {path}: {why}")
    return 0 if plans else 3


# ---------------------------------------------------------------------------------------------- where it runs
_PATH_DESTS = ("model", "scenes", "output", "references", "config")


def on_target(command: str, args: argparse.Namespace, spec: ModelSpec, run_here: Any, *,
               needs_ray_address: bool = True) -> int:
    """Run the command where its flags say, through the one ``Backend.submit`` (as training does): here (local
    Ray, ``--address``) it calls ``run_here()``; with ``--slurm``, ``--k8s`` or ``--submit`` the same command line
    (less those flags, paths made absolute) is the job, whose directory is the output folder."""
    from encdec.launcher.backends.base import command_entry, submit_to_target
    from encdec.launcher.commands.launch import _console

    recipe = None
    if spec.recipe_path is not None:  # its cluster section sizes a job elsewhere; predict asks for --nodes nodes
        from encdec.launcher.recipe.validate import load_recipe

        recipe = load_recipe(spec.recipe_path, spec.overrides)
        recipe.cluster.nodes = args.nodes or 1
    if args.checkpoint not in (None, "best", "last"):
        args.checkpoint = str(Path(args.checkpoint).resolve())
    entry = command_entry(command, args, recipe, run_here, path_dests=_PATH_DESTS,
                          needs_ray_address=needs_ray_address)
    return submit_to_target(entry, args, _console(), job_dir=Path(args.output).resolve(),
                            dry_run=bool(getattr(args, "dry_run", False)))


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Predict's and evaluate's fixable errors (scene, reference, setting) as the CLI's one-line ``error:``."""
    from encdec.predict.errors import PredictError
    from encdec.predict.evaluate import EvaluateError
    from encdec.predict.scenes import SceneError

    try:
        yield
    except (PredictError, EvaluateError, SceneError) as err:
        raise LaunchError(str(err)) from None


def predict_command(args: argparse.Namespace) -> int:
    """CLI body of ``encdec-launch predict``: here, or as a job on Slurm, Kubernetes or a Ray Job."""
    spec = resolve_model(args.model, checkpoint=args.checkpoint, overrides=tuple(args.overrides), config=args.config)
    with user_errors():
        return on_target("predict", args, spec, lambda: predict_here(args, spec))


def predict_here(args: argparse.Namespace, spec: ModelSpec) -> int:
    from encdec.predict.outputs import OutputSpec

    tiled = tiled_from(spec, args.overrides, args.batch_size)
    out_spec = OutputSpec(task=spec.task, class_names=spec.class_names,  # type: ignore[arg-type]
                          probabilities=args.probabilities, quicklook=not args.no_quicklook)
    if args.dry_run:
        return _dry_run(spec, args, tiled, out_spec)
    from encdec.predict.api import predict

    workers = args.workers or (args.nodes or 1)
    # with --address (a cluster, or a Ray Job's `--address auto`) the workers run there, even one: the model
    # belongs on the cluster's nodes (its GPUs), not in the driver
    on_ray = workers > 1 or bool(args.address)
    cluster = _connect(args) if on_ray else None
    try:
        res = predict(spec, args.scenes, args.output, task=spec.task, tiled=tiled, data=spec.data,  # type: ignore[arg-type]
                      class_names=spec.class_names, probabilities=args.probabilities, overwrite=args.overwrite,
                      precision=_precision(spec.precision), device=args.device, workers=workers,  # type: ignore[arg-type]
                      cpus_per_worker=args.cpus_per_worker, strip_rows=args.strip_rows,
                      queue_windows=args.queue_windows, quicklook=not args.no_quicklook,
                      tags={"model": str(spec.path), "recipe_sha256": _recipe_hash(spec)}, progress=True,
                      gdal_options=gdal_options(args.gdal), on_ray=on_ray, gpus_per_worker=args.gpus_per_worker)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.stop()
    for scene, outs in res.outputs.items():
        note = " (already done)" if scene in res.skipped_done else ""
        print(f"{scene} -> {', '.join(str(p) for p in outs.values())}{note}")
    for table in res.tables.values():
        print(f"table: {table}")
    for scene, why in res.failed.items():
        print(f"FAILED {scene}: {why}", file=sys.stderr)
    print(f"{len(res.outputs)} scene(s) written or done, {len(res.failed)} failed; {res.windows} windows in "
          f"{res.seconds:.1f} s ({res.windows_per_s:.1f} windows/s)")
    return 0 if not res.failed else 4


def gdal_options(pairs: list[str] | None) -> dict[str, str]:
    """``--gdal KEY=VALUE`` pairs (GDAL config options for reading scenes, applied with ``rasterio.Env``)."""
    out: dict[str, str] = {}
    for text in pairs or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise LaunchError(f"--gdal {text!r}: expected KEY=VALUE (a GDAL config option, e.g. "
                              f"AWS_S3_ENDPOINT=localhost:9000). Fix: write the option as KEY=VALUE.")
        out[key.strip()] = value
    return out


def _recipe_hash(spec: ModelSpec) -> str:
    import hashlib

    src = spec.config_path or spec.recipe_path or (spec.path / "model.yaml")
    return hashlib.sha256(src.read_bytes()).hexdigest()[:16]


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``predict`` and ``evaluate`` subcommands."""
    from encdec.launcher.backends.flags import add_target_flags

    for name in ("predict", "evaluate"):
        if name == "predict":
            p = sub.add_parser("predict", help="tiled inference of a trained model on scenes of any size -> COGs")
            p.add_argument("model", metavar="MODEL",
                           help="run directory, export folder, or a TerraTorch RUN.ckpt (with --config)")
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
            p.add_argument("--dry-run", action="store_true",
                           help="check the references' grids (or list the split's samples) and show the predict "
                                "plan; build no model, predict nothing")
        p.add_argument("--checkpoint", help="best (default), last, or a checkpoint path (run directories); the "
                                            "TerraTorch .ckpt when MODEL is a TerraTorch config")
        p.add_argument("--config", help="TerraTorch LightningCLI config of MODEL=RUN.ckpt (a TerraTorch checkpoint)")
        p.add_argument("--gdal", action="append", default=[], metavar="KEY=VALUE",
                       help="GDAL config option for reading scenes (AWS_S3_ENDPOINT, AWS_HTTPS=NO, ...); repeatable")
        p.add_argument("--probabilities", nargs="?", const="uint8", choices=["uint8", "float16"],
                       help="also write per-class probabilities (uint8 x254 by default, or float16 values)")
        p.add_argument("--overwrite", action="store_true", help="redo scenes whose outputs exist")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="tiled.crop/stride/delta/average_patches/blend_overlaps/batch_size, or a recipe key")
        p.add_argument("--batch-size", type=int, help="windows per forward pass (tiled.batch_size)")
        p.add_argument("--nodes", type=int, help="local Ray nodes to start (one worker each unless --workers)")
        p.add_argument("--workers", type=int, help="Ray workers (default: --nodes, else 1 in this process)")
        p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs and torch threads per worker")
        p.add_argument("--gpus-per-worker", type=float, default=None,
                       help="GPUs per Ray worker (default: 1 when the cluster has GPUs and --device is unset or cuda)")
        p.add_argument("--address", help="an existing Ray cluster (GCS address) instead of a local one")
        p.add_argument("--device", help="torch device (default: cuda when available)")
        p.add_argument("--strip-rows", type=int, default=2048, help="output rows per unit of work (resume unit)")
        p.add_argument("--queue-windows", type=int, default=32, help="windows read ahead per worker")
        p.add_argument("--no-quicklook", action="store_true", help="skip the PNG quicklooks")
        add_target_flags(p, f"the {name}")  # the launch targets of training: --slurm, --k8s, --submit
