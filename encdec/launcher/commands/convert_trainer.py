"""``convert-terratorch``, the trainer side: Lightning's callbacks, loggers and the plateau LR scheduler.

What maps (the rest of the config is ``convert_terratorch``'s):

- ``EarlyStopping`` -> ``train.early_stop`` (monitor, mode, patience, min_delta; Lightning counts checks, i.e.
  validations, as we do); ``ModelCheckpoint``'s monitor/mode -> ``train.best_metric`` / ``best_mode`` and its
  ``every_n_train_steps`` -> ``train.ckpt_every``;
- ``TensorBoardLogger`` (and ``logger: true``, Lightning's default logger) -> ``track.tensorboard``,
  ``MLFlowLogger`` -> ``track.mlflow``, ``WandbLogger`` -> ``track.wandb``; ``CSVLogger`` needs nothing
  (``metrics.csv`` is always written);
- ``ReduceLROnPlateau``, from LightningCLI's ``lr_scheduler:`` block or TerraTorch's
  ``model.init_args.scheduler`` / ``scheduler_hparams`` -> ``optim.schedule: plateau`` with ``optim.plateau``.

Metric names are TerraTorch's (``val/loss``, ``val/Multiclass_Jaccard_Index``, ``val/mIoU``, ``val/RMSE``...),
mapped to the ones our validation reports (``val/loss``, ``val/mIoU``, ``val/accuracy``, ``val/mAcc``,
``val/IoU_<i>``, ``val/rmse``, ``val/mae``). Everything else, and any value that cannot be carried over, becomes a
note in the conversion report; nothing here is fatal.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainerSide", "map_metric", "split_trainer_side"]

# TerraTorch metric (after the "val/" prefix) -> ours. Two generations: TerraTorch >= 1.0 (mIoU, Pixel_Accuracy,
# Accuracy = macro) and 0.99 (Multiclass_*, Overall_/Average_Accuracy); torchmetrics' micro accuracy over pixels
# is our accuracy, its macro (mean per-class) accuracy our mAcc, its macro Jaccard index our mIoU.
_METRICS = {
    "loss": "loss",
    "mIoU": "mIoU",
    "Multiclass_Jaccard_Index": "mIoU",
    "Multiclass_Jaccard_Index_Macro": "mIoU",
    "Pixel_Accuracy": "accuracy",
    "Accuracy_Micro": "accuracy",
    "Overall_Accuracy": "accuracy",
    "Multiclass_Accuracy": "accuracy",
    "Accuracy": "mAcc",
    "Average_Accuracy": "mAcc",
    "RMSE": "rmse",
    "MAE": "mae",
    # ours, in case a config already uses them
    "accuracy": "accuracy",
    "mAcc": "mAcc",
    "rmse": "rmse",
    "mae": "mae",
}
# per-class IoU: TerraTorch >= 1.0 "IoU_<label>", 0.99 "multiclassjaccardindex_<label>" (labels default to indices)
_PER_CLASS_IOU = re.compile(r"(?:IoU_|multiclassjaccardindex_)(\d+)")
# callbacks that only draw or log what we log anyway
_DISPLAY_ONLY = {"RichProgressBar", "TQDMProgressBar", "ProgressBar", "ModelSummary", "RichModelSummary"}
_PLATEAU_KEYS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown")


@dataclass
class TrainerSide:
    """What the trainer side of a TerraTorch config maps to: recipe keys per section, and notes."""

    train: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    track: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def apply(self, recipe: dict[str, Any], notes: list[str]) -> None:
        """Merge into the recipe ``convert_terratorch.convert`` built (and its notes)."""
        if self.train:
            recipe.setdefault("train", {}).update(self.train)
        if self.optim:
            recipe.setdefault("optim", {}).update(self.optim)
        if self.track:
            recipe["track"] = self.track
        notes.extend(self.notes)


def map_metric(name: Any) -> tuple[str | None, str | None]:
    """A TerraTorch/Lightning validation metric name -> (our name or None, a note or None)."""
    text = str(name)
    m = re.fullmatch(r"val[/_](.+)", text)
    if m is None:
        return None, f"{text!r} is not a validation metric (only validation metrics are watched here)"
    short = m.group(1)
    if short in _METRICS:
        return f"val/{_METRICS[short]}", None
    if (iou := _PER_CLASS_IOU.fullmatch(short)) is not None:
        return f"val/IoU_{iou.group(1)}", None
    if short == "MSE":
        return "val/rmse", f"{text!r} is watched as val/rmse (same order; thresholds now apply to the RMSE)"
    return None, (f"{text!r} has no equivalent; the validation metrics are val/loss, val/mIoU, val/accuracy, "
                  f"val/mAcc, val/IoU_<class>, val/rmse, val/mae")


def split_trainer_side(config: Mapping[str, Any]) -> tuple[dict[str, Any], TrainerSide]:
    """Take the trainer side out of a TerraTorch config.

    Returns:
        The config without what was taken (``trainer.callbacks``, ``trainer.logger``,
        ``trainer.check_val_every_n_epoch``, a ``ReduceLROnPlateau`` in ``lr_scheduler`` or in the task's
        ``scheduler``), for ``convert_terratorch`` to convert the rest; and what it maps to.
    """
    rest: dict[str, Any] = copy.deepcopy(dict(config))
    side = TrainerSide()
    trainer = rest.get("trainer")
    if isinstance(trainer, Mapping):
        trainer = dict(trainer)
        if "callbacks" in trainer:
            _callbacks(trainer.pop("callbacks"), side)
        if "logger" in trainer:
            _loggers(trainer.pop("logger"), side)
        every = trainer.pop("check_val_every_n_epoch", None)
        rest["trainer"] = trainer
    else:
        every = None
    _scheduler(rest, side)
    if every is not None or side.train.get("early_stop") or side.optim.get("plateau") is not None:
        side.notes.append(
            f"trainer.check_val_every_n_epoch={every if every is not None else 1}: validation runs every "
            "train.val_every steps (default 500), not per epoch; early-stop and plateau patience count validations, "
            "so set train.val_every to the steps of that many epochs (train tiles / data.global_batch_size each)")
    return rest, side


# ----------------------------------------------------------------------------------------------- callbacks
def _callbacks(callbacks: Any, side: TrainerSide) -> None:
    items = callbacks if isinstance(callbacks, list) else [callbacks]
    for i, cb in enumerate(items):
        where = f"trainer.callbacks[{i}]"
        name, args = _class_and_args(cb)
        if name == "EarlyStopping":
            if "early_stop" in side.train:
                side.notes.append(f"{where} EarlyStopping: a second one; only the first is mapped")
            else:
                _early_stop(args, where, side)
        elif name == "ModelCheckpoint":
            _model_checkpoint(args, where, side)
        elif name == "LearningRateMonitor":
            side.notes.append(f"{where} LearningRateMonitor: nothing to do, train/lr is always logged")
        elif name in _DISPLAY_ONLY:
            side.notes.append(f"{where} {name}: display only, the run logs to its driver's terminal")
        else:
            side.notes.append(f"{where} {name if name else repr(cb)}: callback without an equivalent")


def _early_stop(args: dict[str, Any], where: str, side: TrainerSide) -> None:
    monitor = args.pop("monitor", None)
    metric, why = map_metric(monitor) if monitor is not None else (None, "no monitor given")
    if metric is None:
        side.notes.append(f"{where} EarlyStopping not mapped: monitor {why}")
        return
    if why:
        side.notes.append(f"{where} EarlyStopping: monitor {why}")
    out: dict[str, Any] = {"metric": metric, "mode": _mode(args.pop("mode", "min"), where, side)}
    patience = int(args.pop("patience", 3))  # Lightning's default
    if patience < 1:
        side.notes.append(f"{where} EarlyStopping patience {patience}: at least 1 here, set to 1")
    out["patience"] = max(1, patience)
    if "min_delta" in args:
        out["min_delta"] = abs(float(args.pop("min_delta")))  # Lightning takes its magnitude too
    for key in ("verbose", "strict", "log_rank_zero_only", "check_on_train_epoch_end"):
        args.pop(key, None)  # where and how loudly Lightning checks: the decision is the same
    side.notes += [f"{where} EarlyStopping.{k}={v!r}: no equivalent" for k, v in sorted(args.items()) if v is not None]
    side.train["early_stop"] = out


def _model_checkpoint(args: dict[str, Any], where: str, side: TrainerSide) -> None:
    monitor = args.pop("monitor", None)
    mode = args.pop("mode", "min")
    if monitor is not None:
        metric, why = map_metric(monitor)
        if metric is None:
            side.notes.append(f"{where} ModelCheckpoint.monitor {why}; the best checkpoint follows the task's default")
        else:
            if why:
                side.notes.append(f"{where} ModelCheckpoint.monitor {why}")
            side.train["best_metric"], side.train["best_mode"] = metric, _mode(mode, where, side)
    steps = args.pop("every_n_train_steps", None)
    if steps:
        side.train["ckpt_every"] = int(steps)
    left = sorted(k for k, v in args.items() if v is not None)
    if left:
        side.notes.append(f"{where} ModelCheckpoint {', '.join(left)}: not mapped (a run keeps its last "
                          "train.keep_last checkpoints and the best one, under <run_dir>/checkpoints)")


def _mode(mode: Any, where: str, side: TrainerSide) -> str:
    if mode in ("min", "max"):
        return str(mode)
    side.notes.append(f"{where} mode {mode!r}: min or max only, using min")
    return "min"


# ------------------------------------------------------------------------------------------------- loggers
def _loggers(logger: Any, side: TrainerSide) -> None:
    if logger is None or logger is False:
        return
    items = [logger] if not isinstance(logger, list) else logger
    for i, item in enumerate(items):
        where = "trainer.logger" if not isinstance(logger, list) else f"trainer.logger[{i}]"
        if item is True:  # Lightning's default logger: TensorBoard where it is installed (TerraTorch installs it)
            item = {"class_path": "TensorBoardLogger"}
        name, args = _class_and_args(item)
        kind = {"TensorBoardLogger": "tensorboard", "MLFlowLogger": "mlflow", "WandbLogger": "wandb"}.get(name or "")
        if name == "CSVLogger":
            side.notes.append(f"{where} CSVLogger: nothing to do, metrics.csv is always written in the run directory")
        elif kind is None:
            side.notes.append(f"{where} {name if name else repr(item)}: logger without an equivalent (track: has "
                              "tensorboard, mlflow and wandb)")
        elif kind in side.track:
            side.notes.append(f"{where} {name}: a second one; only the first is mapped")
        elif kind == "tensorboard":
            _tensorboard(args, where, side)
        elif kind == "mlflow":
            _mlflow(args, where, side)
        else:
            _wandb(args, where, side)


def _tensorboard(args: dict[str, Any], where: str, side: TrainerSide) -> None:
    save_dir, name = args.pop("save_dir", None), args.pop("name", "lightning_logs")
    if save_dir and not _placeholder(save_dir):
        side.track["tensorboard"] = f"{str(save_dir).rstrip('/')}/{name}" if name else str(save_dir)
    else:
        side.track["tensorboard"] = True
        if save_dir:
            side.notes.append(f"{where} TensorBoardLogger.save_dir {save_dir!r} is a placeholder: event files go "
                              "to <run_dir>/tensorboard (or set track.tensorboard to a folder)")
    _rest(args, where, "TensorBoardLogger", side)


def _mlflow(args: dict[str, Any], where: str, side: TrainerSide) -> None:
    from pydantic import ValidationError

    from encdec.config.track import MlflowConfig

    out: dict[str, Any] = {}
    uri = args.pop("tracking_uri", None)
    save_dir = args.pop("save_dir", None)
    if uri and not _placeholder(uri):
        try:
            MlflowConfig.model_validate({"tracking_uri": str(uri)})
            out["tracking_uri"] = str(uri)
        except ValidationError:
            side.notes.append(f"{where} MLFlowLogger.tracking_uri carries credentials: left out (give the URI "
                              "without them in track.mlflow.tracking_uri and export MLFLOW_TRACKING_USERNAME/PASSWORD)")
    else:
        side.notes.append(f"{where} MLFlowLogger without a tracking_uri (Lightning's local files in "
                          f"{save_dir or './mlruns'}): the embedded store in the run directory is used instead (or set "
                          "track.mlflow.tracking_uri)")
    for ours, theirs in (("experiment", "experiment_name"), ("run_name", "run_name")):
        if args.get(theirs) is not None:
            out[ours] = str(args.pop(theirs))
        args.pop(theirs, None)
    tags = args.pop("tags", None)
    if isinstance(tags, Mapping):
        out["tags"] = {str(k): str(v) for k, v in tags.items()}
    if args.pop("log_model", None):
        side.notes.append(f"{where} MLFlowLogger.log_model: nothing to do, the exported model is logged as an "
                          "artifact at the end of the run")
    _rest(args, where, "MLFlowLogger", side)
    side.track["mlflow"] = out


def _wandb(args: dict[str, Any], where: str, side: TrainerSide) -> None:
    project = args.pop("project", None)
    if project is None:
        side.notes.append(f"{where} WandbLogger without project: Lightning's default 'lightning_logs' is used")
    out: dict[str, Any] = {"project": str(project or "lightning_logs")}
    if args.get("entity") is not None:
        out["entity"] = str(args.pop("entity"))
    offline = bool(args.pop("offline", False))
    out["mode"] = "offline" if offline else "online"
    if not offline:
        side.notes.append(f"{where} WandbLogger is online: export WANDB_API_KEY where you launch the run (never in "
                          "the recipe), or set track.wandb.mode: offline")
    _rest(args, where, "WandbLogger", side)
    side.track["wandb"] = out


def _rest(args: dict[str, Any], where: str, name: str, side: TrainerSide) -> None:
    left = sorted(k for k, v in args.items() if v is not None)
    if left:
        side.notes.append(f"{where} {name} {', '.join(left)}: not mapped")


# ----------------------------------------------------------------------------------------------- scheduler
def _scheduler(config: dict[str, Any], side: TrainerSide) -> None:
    """ReduceLROnPlateau from LightningCLI's ``lr_scheduler:`` or the TerraTorch task's ``scheduler``.

    LightningCLI replaces the task's ``configure_optimizers`` when the config has an ``optimizer:`` block, so the
    task's scheduler only counts without one.
    """
    sched = config.get("lr_scheduler")
    if isinstance(sched, Mapping) and _class_and_args(sched)[0] == "ReduceLROnPlateau":
        config.pop("lr_scheduler")
        args = _class_and_args(sched)[1]
        monitor = args.pop("monitor", None)
        if monitor is None:
            side.notes.append("lr_scheduler ReduceLROnPlateau without monitor: watching val/loss")
        _plateau(args, "val/loss" if monitor is None else monitor, "lr_scheduler.init_args", side)
    model = config.get("model")
    margs = model.get("init_args") if isinstance(model, Mapping) else None
    if not isinstance(margs, dict) or str(margs.get("scheduler") or "").rsplit(".", 1)[-1] != "ReduceLROnPlateau":
        return
    margs.pop("scheduler")
    hparams = dict(margs.pop("scheduler_hparams", None) or {})
    if "optimizer" in config or side.optim:
        side.notes.append("model.init_args.scheduler ReduceLROnPlateau: not used by TerraTorch either (LightningCLI's "
                          "optimizer:/lr_scheduler: blocks replace the task's optimizer and scheduler)")
        return
    interval = hparams.pop("interval", "epoch")
    if interval != "epoch":
        side.notes.append(f"model.init_args.scheduler_hparams.interval {interval!r}: the plateau is checked after "
                          "each validation here")
    _plateau(hparams, "val/loss", "model.init_args.scheduler_hparams", side)  # TerraTorch's tasks monitor val/loss


def _plateau(args: dict[str, Any], monitor: Any, where: str, side: TrainerSide) -> None:
    metric, why = map_metric(monitor)
    if metric is None:
        side.notes.append(f"{where}: ReduceLROnPlateau not mapped: monitor {why}; the schedule stays the default")
        return
    if why:
        side.notes.append(f"{where}: monitor {why}")
    plateau: dict[str, Any] = {"metric": metric}
    for key in _PLATEAU_KEYS:
        if args.get(key) is not None:
            value = args.pop(key)
            plateau[key] = value if key in ("mode", "threshold_mode") else (int(value) if key in ("patience", "cooldown")
                                                                            else float(value))
    side.optim.update({"schedule": "plateau", "plateau": plateau})
    min_lr = args.pop("min_lr", None)
    if isinstance(min_lr, (int, float)) and min_lr > 0:
        side.optim["min_lr"] = float(min_lr)
    elif isinstance(min_lr, list):
        side.notes.append(f"{where}.min_lr {min_lr!r}: one floor for every parameter group here, none set")
    for key in ("optimizer", "verbose", "eps"):
        args.pop(key, None)  # the optimizer is ours; eps is torch's default 1e-8 here
    side.notes += [f"{where}.{k}={v!r}: no equivalent" for k, v in sorted(args.items()) if v is not None]


# ------------------------------------------------------------------------------------------------- helpers
def _class_and_args(item: Any) -> tuple[str | None, dict[str, Any]]:
    """``{class_path: a.b.Name, init_args: {...}}`` or ``"Name"`` -> ("Name", init_args)."""
    if isinstance(item, str):
        return item.rsplit(".", 1)[-1], {}
    if isinstance(item, Mapping) and item.get("class_path"):
        return str(item["class_path"]).rsplit(".", 1)[-1], dict(item.get("init_args") or {})
    return None, {}


def _placeholder(value: Any) -> bool:
    """``<your_dir>``, ``<PATH/TO/...>``: the official configs leave paths for the user to fill in."""
    return bool(re.search(r"<[^>]*>", str(value)))
