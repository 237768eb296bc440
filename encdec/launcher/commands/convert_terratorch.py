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
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["convert", "convert_command"]

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
IGNORED_DATA = {"num_workers", "rgb_indices", "constant_scale", "plot_on_val", "drop_last", "pin_memory"}


def _short(name: str) -> str:
    return str(name).rsplit(".", 1)[-1]


def _grep_suffix(pattern: str | None) -> str | None:
    """``*_S2Hand.tif`` -> ``_S2Hand.tif`` (only a leading ``*`` is expressible as a suffix)."""
    if not pattern:
        return None
    m = re.fullmatch(r"\*([^*?\[\]]+)", pattern)
    return m.group(1) if m else None


def convert(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A TerraTorch LightningCLI config -> (recipe data, list of what did not map and why)."""
    notes: list[str] = []
    trainer = dict(config.get("trainer") or {})
    model_cfg = dict(config.get("model") or {})
    margs = dict(model_cfg.get("init_args") or {})
    task_cls = _short(model_cfg.get("class_path", ""))
    task = TERRATORCH_TASKS.get(task_cls)
    if task is None:
        raise LaunchError(f"model.class_path {model_cfg.get('class_path')!r} is not a TerraTorch task this converter "
                          f"knows ({', '.join(TERRATORCH_TASKS)})")
    factory = margs.pop("model_factory", "EncoderDecoderFactory")
    if _short(factory) != "EncoderDecoderFactory":
        notes.append(f"model_factory {factory!r}: only EncoderDecoderFactory models map (model_args copied as is)")
    model = dict(margs.pop("model_args", None) or {})
    if not model:
        raise LaunchError("model.init_args.model_args is missing: nothing to build")

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

    data, data_notes = _convert_data(config.get("data") or {}, model)
    notes += data_notes
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
    return recipe, notes


def _convert_data(data_cfg: Mapping[str, Any], model: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    from encdec.launcher.commands.convert_data_layout import convert_layout

    notes: list[str] = []
    data, unmapped, args = convert_layout(data_cfg)  # generic and Sen1Floods11 data modules: layouts mapped exactly
    if data:
        notes += [f"NOT MAPPED (changes the samples or their values): {u}" for u in unmapped]
        img = args.pop("img_size", None) or model.get("backbone_img_size")
        if img:
            data["img_size"] = int(img)
        if args.get("batch_size"):
            data["_batch_size"] = args.pop("batch_size")
        for key in sorted(args):
            why = "TerraTorch loader setting" if key in IGNORED_DATA else "no equivalent"
            notes.append(f"data.init_args.{key}: {why}")
        return data, notes
    args = dict(data_cfg.get("init_args") or {})
    bands = args.pop("output_bands", None) or args.pop("dataset_bands", None) or model.get("backbone_bands")
    args.pop("dataset_bands", None)
    if bands:
        data["bands"] = list(bands)
    for key in ("means", "stds"):
        if args.get(key) is not None:
            data[key] = list(args.pop(key))
    img = args.pop("img_size", None) or model.get("backbone_img_size")
    if img:
        data["img_size"] = int(img)
    if args.get("batch_size"):
        data["_batch_size"] = args.pop("batch_size")
    image_suffix = _grep_suffix(args.pop("img_grep", None))
    mask_suffix = _grep_suffix(args.pop("label_grep", None))
    for split in ("train", "val", "test"):
        root = args.pop(f"{split}_data_root", None)
        label_root = args.pop(f"{split}_label_data_root", None)
        args.pop(f"{split}_split", None)
        if not root:
            continue
        src: dict[str, Any] = {"tiles": str(root)}
        if image_suffix:
            src["image_suffix"] = image_suffix
        if mask_suffix:
            src["mask_suffix"] = mask_suffix
        if label_root and str(label_root) != str(root):
            notes.append(f"data.{split}: labels live in another folder ({label_root}); tiles pair masks in the same "
                         f"folder by suffix: list the pairs in a manifest (data.{split}.manifest)")
        data[split] = src
    if "train" not in data:
        notes.append("no train_data_root: set data.train yourself")
        data["train"] = {"tiles": "CHANGE_ME"}
    for key in ("no_label_replace", "no_data_replace"):
        if key in args:
            notes.append(f"data.{key}={args.pop(key)!r}: nodata handling is automatic (mask nodata -> ignore_index)")
    for key in sorted(args):
        why = "TerraTorch loader setting" if key in IGNORED_DATA else "no equivalent"
        notes.append(f"data.init_args.{key}: {why}")
    if _short(data_cfg.get("class_path", "")) and "Generic" not in str(data_cfg.get("class_path", "")):
        notes.append(f"data.class_path {data_cfg.get('class_path')!r}: a specific datamodule; check the paths")
    return data, notes


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


def convert_command(args: argparse.Namespace) -> int:
    """CLI body of ``encdec-launch convert-terratorch``."""
    from encdec.launcher.recipe.errors import RecipeError
    from encdec.launcher.recipe.validate import recipe_from_dict

    path = Path(args.config)
    if not path.is_file():
        raise LaunchError(f"{path} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    recipe, notes = convert(config)
    header = [f"# converted from TerraTorch config {path.name} by encdec-launch convert-terratorch"]
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
    for n in notes:
        print(f"not mapped: {n}", file=sys.stderr)
    return 0
