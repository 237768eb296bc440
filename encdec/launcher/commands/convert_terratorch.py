"""TerraTorch users: ``convert-terratorch CONFIG.yaml`` -> a recipe, and ``--init-from`` TerraTorch checkpoints.

A TerraTorch fine-tuning config is a LightningCLI YAML (``trainer``, ``data``, ``model``, ``optimizer``,
``lr_scheduler``). What maps: ``model.init_args.model_args`` (unchanged: our ``model`` block is the same
factory contract), the task class, loss / ignore_index / class_weights / freeze flags, the data module's bands,
statistics, roots and file patterns, batch size, the optimizer and cosine schedule, epochs/steps, precision,
accumulation, clipping, seed, nodes/devices and the Lightning strategy. Everything else is listed, with why,
at the top of the written recipe and on the terminal, so nothing is dropped silently.

The weights of a TerraTorch run come in with ``--init-from FILE.ckpt``: ``encdec.models.terratorch_ckpt`` reads
the Lightning checkpoint (without TerraTorch installed) and maps its key names; ``encdec.launcher.preflight.init_from``
checks it against the recipe's model before any cluster starts.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from encdec.config import ClusterSection
from encdec.launcher.commands.convert_data_layout import convert_layout, native_size
from encdec.launcher.commands.convert_transforms import convert_transforms
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["convert", "convert_command", "placeholders"]

TERRATORCH_TASKS = {
    "SemanticSegmentationTask": "segmentation",
    "PixelwiseRegressionTask": "regression",
    "ClassificationTask": "classification",
}
TERRATORCH_LOSSES = {"ce": "ce", "dice": "dice", "mse": "mse", "l1": "l1", "mae": "mae", "huber": "huber", "rmse": "mse"}
LIGHTNING_PRECISIONS = {"16-mixed": "fp16", "16": "fp16", "bf16-mixed": "bf16", "bf16": "bf16", "bf16-true": "bf16",
             "32": "fp32", "32-true": "fp32", "64": None}
LIGHTNING_STRATEGIES = {"ddp": ("ddp", None), "ddp_find_unused_parameters_true": ("ddp", None), "fsdp": ("fsdp", None),
                        "deepspeed_stage_2": ("deepspeed", 2), "deepspeed_stage_3": ("deepspeed", 3), "auto": (None, None)}
# data-module keys that configure only TerraTorch's own plotting/loading and have no meaning here
IGNORED_DATA = {"num_workers", "rgb_indices", "plot_on_val", "drop_last", "pin_memory", "prefetch_factor",
                "train_shuffle"}


def _short(name: str) -> str:
    return str(name).rsplit(".", 1)[-1]


PLACEHOLDER = re.compile(r"<[^<>]+>")
# placeholders there configure what is listed as not mapped (loggers, callbacks): named, never to be filled
IGNORED_PLACEHOLDER_KEYS = ("trainer.logger", "trainer.callbacks")
# PrithviModelFactory's own arguments -> EncoderDecoderFactory's (TerraTorch 1.2.11 prithvi_model_factory.py)
PRITHVI_FACTORY_ARGS = {"bands": "backbone_bands", "pretrained": "backbone_pretrained",
                        "num_frames": "backbone_num_frames"}


def placeholders(config: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``<...>`` placeholder left in a config, as ``(dotted key, value)``, in file order."""
    found: list[tuple[str, str]] = []
    if isinstance(config, Mapping):
        for key, value in config.items():
            found += placeholders(value, f"{path}.{key}" if path else str(key))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found += placeholders(value, f"{path}[{i}]")
    elif isinstance(config, str) and PLACEHOLDER.search(config):
        found.append((path, config))
    return found


def _prithvi_factory_args(model: dict[str, Any], unmapped: list[str]) -> dict[str, Any]:
    """PrithviModelFactory ``model_args`` -> EncoderDecoderFactory's, as that factory forwards them (no necks)."""
    out = {PRITHVI_FACTORY_ARGS.get(k, k): v for k, v in model.items() if k != "in_channels"}
    in_channels = model.get("in_channels")
    bands = model.get("bands") or []
    if in_channels is not None and int(in_channels) != len(bands):
        unmapped.append(f"model.init_args.model_args.in_channels={in_channels} but bands has {len(bands)}: "
                        "PrithviModelFactory then builds a patch embedding of another width than the bands read")
    return out


def convert(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """A TerraTorch LightningCLI config -> ``(recipe, notes, unmapped)``.

    ``notes`` lists what did not map and why where that leaves the samples as they are (loggers, callbacks, loader
    settings, ...); ``unmapped`` what would change the samples or their values (the command refuses it unless
    ``--allow-unmapped``).
    """
    from encdec.launcher.commands.convert_trainer import split_trainer_side

    config, trainer_side = split_trainer_side(config)  # callbacks, loggers, ReduceLROnPlateau
    notes: list[str] = []
    trainer = dict(config.get("trainer") or {})
    model_cfg = dict(config.get("model") or {})
    margs = dict(model_cfg.get("init_args") or {})
    task_cls = _short(model_cfg.get("class_path", ""))
    task = TERRATORCH_TASKS.get(task_cls)
    if task is None:
        raise LaunchError(f"model.class_path {model_cfg.get('class_path')!r} is not a TerraTorch task this converter "
                          f"knows ({', '.join(TERRATORCH_TASKS)})")
    factory = _short(margs.pop("model_factory", "EncoderDecoderFactory"))
    model = dict(margs.pop("model_args", None) or {})
    if not model:
        raise LaunchError("model.init_args.model_args is missing: nothing to build")
    unmapped: list[str] = []
    if factory == "PrithviModelFactory":
        model = _prithvi_factory_args(model, unmapped)
    elif factory != "EncoderDecoderFactory":
        unmapped.append(f"model.init_args.model_factory {factory!r}: only EncoderDecoderFactory and "
                        "PrithviModelFactory models map")

    recipe: dict[str, Any] = {"task": task, "run": {"name": "terratorch"}, "model": model}
    if "seed_everything" in config and isinstance(config["seed_everything"], int):
        recipe["run"]["seed"] = config["seed_everything"]

    loss: dict[str, Any] = {}
    tt_loss = margs.pop("loss", None)
    if tt_loss is not None:
        if str(tt_loss).lower() in TERRATORCH_LOSSES:
            loss["name"] = TERRATORCH_LOSSES[str(tt_loss).lower()]
        else:
            notes.append(f"loss {tt_loss!r} has no equivalent (ce, dice, ce_dice, mse, l1, huber): using the default")
    for key in ("ignore_index", "class_weights"):
        if margs.get(key) is not None:
            loss[key] = margs.pop(key)
        margs.pop(key, None)
    recipe["loss"] = loss

    train: dict[str, Any] = {}
    for key in ("freeze_backbone", "freeze_decoder"):
        if key in margs:
            train[key] = bool(margs.pop(key))
    for key in sorted(margs):
        notes.append(f"model.init_args.{key}: TerraTorch task option without an equivalent")

    data, data_notes, data_unmapped = _convert_data(config.get("data") or {}, model)
    notes += data_notes
    unmapped += data_unmapped
    recipe["data"] = data

    optim, optim_notes = _convert_optim(config.get("optimizer"), config.get("lr_scheduler"))
    notes += optim_notes
    if trainer.get("accumulate_grad_batches"):
        optim["grad_accum"] = int(trainer.pop("accumulate_grad_batches"))
    if trainer.get("gradient_clip_val") is not None:
        optim["grad_clip"] = float(trainer.pop("gradient_clip_val"))
    recipe["optim"] = optim

    if trainer.get("max_steps") not in (None, -1):
        train["max_steps"] = int(trainer.pop("max_steps"))
        trainer.pop("max_epochs", None)
    elif trainer.get("max_epochs") is not None:
        train["epochs"] = int(trainer.pop("max_epochs"))
    else:
        train["epochs"] = 1
        notes.append("trainer.max_epochs/max_steps missing: epochs set to 1, adjust train.epochs")
    prec = trainer.pop("precision", None)
    if prec is not None:
        mapped = LIGHTNING_PRECISIONS.get(str(prec))
        if mapped:
            train["precision"] = mapped
        else:
            notes.append(f"trainer.precision {prec!r}: no equivalent, using auto")
    if trainer.get("log_every_n_steps"):
        train["log_every"] = int(trainer.pop("log_every_n_steps"))
    strategy = trainer.pop("strategy", None)
    if strategy is not None:
        name, stage = LIGHTNING_STRATEGIES.get(str(strategy), (None, None))
        if name:
            train["strategy"] = name
            if stage:
                train["zero_stage"] = stage
        elif str(strategy) != "auto":
            notes.append(f"trainer.strategy {strategy!r}: no equivalent, using ddp")
    recipe["train"] = train

    cluster: dict[str, Any] = {}
    if isinstance(trainer.get("num_nodes"), int):
        cluster["nodes"] = trainer.pop("num_nodes")
    devices = trainer.pop("devices", None)
    if isinstance(devices, int) and devices > 0:
        cluster["workers_per_node"] = devices
    elif devices not in (None, "auto"):
        notes.append(f"trainer.devices {devices!r}: set cluster.workers_per_node yourself")
    accel = str(trainer.pop("accelerator", "auto"))
    if accel in ("gpu", "cuda"):
        cluster["gpus_per_worker"] = 1
    if trainer.get("default_root_dir"):
        cluster["storage"] = trainer.pop("default_root_dir")
    recipe["cluster"] = cluster
    per_device = data.pop("_batch_size", None)
    if per_device is not None:
        data["global_batch_size"] = (int(per_device) * ClusterSection.written_or_default(cluster, "nodes")
                                     * ClusterSection.written_or_default(cluster, "workers_per_node"))
    for key in sorted(trainer):
        notes.append(f"trainer.{key}: Lightning option without an equivalent (callbacks, loggers, ...)")
    trainer_side.apply(recipe, notes)
    return recipe, notes, unmapped


def _convert_data(data_cfg: Mapping[str, Any], model: dict[str, Any]
                  ) -> tuple[dict[str, Any], list[str], list[str]]:
    """The data module -> ``(data, notes, unmapped)``; ``data`` holds ``_batch_size`` (per device) for the caller."""
    data, unmapped, args = convert_layout(data_cfg, model)
    augment, crop, notes, transform_unmapped = convert_transforms(args)
    unmapped += transform_unmapped
    if data:
        if augment:
            data["augment"] = augment
        size = args.pop("img_size", None) or crop or native_size(data)
        if size is None and model.get("backbone_img_size"):
            size = model["backbone_img_size"]
            notes.append(f"data.img_size={size} from model.backbone_img_size: the files were not readable from here; "
                         "TerraTorch feeds them whole, so set it to their size")
        if size:
            data["img_size"] = int(size)
        _match_backbone_bands(model, data, unmapped)
        want = model.get("backbone_num_frames")
        frames = int(data["num_frames"]) if "num_frames" in data else 1  # the recipe dict being built
        if want is not None and int(want) != frames:
            unmapped.append(f"model.backbone_num_frames={want} but the data module gives {frames} time step(s) per "
                            "sample (data.num_frames)")
    if args.get("batch_size"):
        data["_batch_size"] = args.pop("batch_size")
    for key in sorted(args):
        why = "TerraTorch loader setting" if key in IGNORED_DATA else "no equivalent"
        notes.append(f"data.init_args.{key}: {why}")
    return data, notes, unmapped


def _match_backbone_bands(model: dict[str, Any], data: Mapping[str, Any], unmapped: list[str]) -> None:
    """``backbone_bands`` naming other bands than the data module reads, position by position.

    TerraTorch feeds the data module's bands whatever the names: a name without pretrained weights (NIR_BROAD for
    HLS Prithvi) gets a randomly initialised patch embedding for the band actually read. Our recipe requires the
    two lists to be equal, so this is listed, and ``backbone_bands`` becomes the bands read (pretrained weights).
    """
    named = model.get("backbone_bands")
    bands = list(data.get("bands") or [])
    if not named or list(named) == bands:
        return
    if len(named) == len(bands):
        diff = [f"{i}: {a} (read: {b})" for i, (a, b) in enumerate(zip(named, bands, strict=True)) if a != b]
        unmapped.append(f"model.backbone_bands names other bands than the data module reads ({'; '.join(diff)}): "
                        "TerraTorch gives those channels a randomly initialised patch embedding; the recipe sets "
                        f"backbone_bands to the bands read, {bands} (their pretrained weights)")
        model["backbone_bands"] = bands


def _convert_optim(opt: Any, sched: Any) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    out: dict[str, Any] = {}
    if isinstance(opt, Mapping):
        name = _short(opt.get("class_path", "AdamW")).lower()
        args = dict(opt.get("init_args") or {})
        out["name"] = "sgd" if name == "sgd" else "adamw"
        if name not in ("adamw", "adam", "sgd"):
            notes.append(f"optimizer {opt.get('class_path')!r}: using adamw")
        # only the chosen optimizer's own options: the recipe refuses the other one's (momentum under AdamW)
        for key in ("lr", "weight_decay", "momentum" if out["name"] == "sgd" else "eps"):
            if key in args:
                out[key] = float(args.pop(key))
        if out["name"] == "sgd" and "nesterov" in args:
            out["nesterov"] = bool(args.pop("nesterov"))
        if out["name"] == "adamw" and "betas" in args:
            out["betas"] = list(args.pop("betas"))
        notes += [f"optimizer.init_args.{k}: no equivalent" for k in sorted(args)]
    if isinstance(sched, Mapping):
        name = _short(sched.get("class_path", ""))
        if name == "CosineAnnealingLR":
            out["schedule"] = "cosine"
            eta = (sched.get("init_args") or {}).get("eta_min")
            if eta:
                out["min_lr"] = float(eta)
        else:
            out["schedule"] = "constant"
            notes.append(f"lr_scheduler {name or sched!r}: no equivalent; using a constant LR (try cosine)")
    return out, notes


def _load_yaml(text: str) -> tuple[Any, list[tuple[int, str]]]:
    """``yaml.safe_load`` (the last of duplicate keys wins, as in TerraTorch's jsonargparse) that also returns the
    duplicates as ``(line, key)``: the official multicrop config sets ``backbone_pretrained`` twice."""
    from encdec.config.yaml_load import DuplicateKeyError, safe_load

    try:
        return safe_load(text) or {}, []
    except DuplicateKeyError as err:  # the same checker as recipes', then read as TerraTorch reads it
        return yaml.safe_load(text) or {}, [(d.line, str(d.path[-1])) for d in err.duplicates]


def convert_command(args: argparse.Namespace) -> int:
    """CLI body of ``encdec-launch convert-terratorch``.

    Refuses (no recipe written) a config with ``<...>`` placeholders in keys that reach the recipe, and one with
    settings that change the samples or their values without an equivalent, unless ``--allow-unmapped``.
    """
    from encdec.launcher.recipe.errors import RecipeError
    from encdec.launcher.recipe.validate import recipe_from_dict

    path = Path(args.config)
    from encdec.config.yaml_load import NotTextError, read_text

    try:  # a directory, a GeoTIFF, bytes that are not text: one line saying so
        text = read_text(path, "TerraTorch config")
    except (FileNotFoundError, NotTextError) as err:
        raise LaunchError(str(err)) from None
    try:
        config, duplicates = _load_yaml(text)
    except yaml.YAMLError as err:
        raise LaunchError(f"{path} is not a YAML file ({type(err).__name__}: {str(err).splitlines()[0]}); give the "
                          "TerraTorch (LightningCLI) config YAML") from err
    if not isinstance(config, Mapping):
        raise LaunchError(f"{path} holds a {type(config).__name__}, not a TerraTorch config (a mapping with model:, "
                          "data:, trainer:)")
    holes = placeholders(config)
    fill = [(k, v) for k, v in holes if not k.startswith(IGNORED_PLACEHOLDER_KEYS)]
    if fill:
        raise LaunchError(f"{path} has {len(fill)} placeholder(s) to fill with real values before it converts:\n"
                          + "\n".join(f"  {k}: {v}" for k, v in fill))
    recipe, notes, unmapped = convert(config)
    notes += [f"line {line}: {key!r} given twice in one mapping; the last value is used, as TerraTorch does"
              for line, key in duplicates]
    notes += [f"{k}: placeholder {v!r} in a setting that is not mapped" for k, v in holes]
    if unmapped and not getattr(args, "allow_unmapped", False):
        raise LaunchError(f"{path}: {len(unmapped)} setting(s) change the samples or their values and have no "
                          "equivalent here, so the recipe would train on other data than the config:\n"
                          + "\n".join(f"  - {u}" for u in unmapped)
                          + "\nFix them in the config, or pass --allow-unmapped to write the recipe without them.")
    header = [f"# converted from TerraTorch config {path.name} by encdec-launch convert-terratorch"]
    header += ["# NOT MAPPED, changes the samples or their values (--allow-unmapped):"]  if unmapped else []
    header += [f"#   - {u}" for u in unmapped]
    header += ["# not mapped:"] + [f"#   - {n}" for n in notes] if notes else ["# everything mapped"]
    text = "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False)
    try:
        recipe_from_dict(yaml.safe_load(text), source=str(path))
        valid = True
    except RecipeError as err:
        valid = False
        print(f"note: the converted recipe needs edits before it runs:\n{err}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}" + ("" if valid else " (fix the problems above)"))
    else:
        print(text)
    for u in unmapped:
        print(f"NOT MAPPED (allowed by --allow-unmapped): {u}", file=sys.stderr)
    for n in notes:
        print(f"not mapped: {n}", file=sys.stderr)
    return 0
