"""The pieces ``encdec.train.loop.train`` is assembled from: the ``train:`` section, seeding and RNG state,
the trainable set, device placement and validation in lock-step across ranks."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "LoopConfig",
    "LoopConfigError",
    "capture_rng",
    "evaluate",
    "freeze",
    "load_init_from",
    "load_pretrained_weights",
    "restore_rng",
    "seed_everything",
    "to_device",
]

# keys of the train section read elsewhere (the launcher); accepted here so one section serves both
_LAUNCHER_KEYS = {"max_failures", "early_stop"}  # early_stop: read by the loop (encdec.train.early_stop)
_BEST_DEFAULTS = {
    "segmentation": ("val/mIoU", "max"),
    "classification": ("val/accuracy", "max"),
    "regression": ("val/rmse", "min"),
    "scalar_regression": ("val/rmse", "min"),
}


class LoopConfigError(ValueError):
    """The ``train:`` section is invalid."""


@dataclass(frozen=True)
class LoopConfig:
    """The recipe's ``train:`` section as the loop reads it.

    Attributes:
        max_steps: optimizer steps to train (wins over ``epochs``).
        epochs: epochs to train when ``max_steps`` is not given (an epoch = the data's ``steps_per_epoch``).
        precision: ``auto`` | ``bf16`` | ``fp16`` | ``fp32``.
        strategy: ``none`` | ``ddp`` | ``fsdp`` | ``deepspeed``.
        zero_stage: DeepSpeed ZeRO stage (2 or 3).
        activation_checkpointing: recompute each block's activations in backward.
        compile: ``torch.compile`` each sharding unit (encoder blocks, decoder).
        val_every: validate every this many steps and after the last one (0: never; needs ``data.val``).
        ckpt_every: checkpoint every this many steps (the last step always checkpoints).
        keep_last: checkpoints kept besides the best.
        log_every: report training metrics every this many steps.
        freeze_backbone: freeze the encoder (PEFT adapters stay trainable).
        freeze_decoder: freeze the decoder.
        best_metric: validation metric that picks the best checkpoint (default per task: ``val/mIoU``,
            ``val/accuracy`` or ``val/rmse``).
        best_mode: ``max`` or ``min`` for ``best_metric``.
        adapter_only: checkpoints hold only trainable parameters (default: True for PEFT runs, whose frozen
            base is rebuilt from the pretrained weights and the seed on resume).
        reshard_after_forward: FSDP only: free gathered weights after each unit's forward (least memory).
        build_on_rank0: FSDP only: rank 0 builds the model (and loads its weights), other ranks build it on the
            meta device and receive their shards from rank 0 at set-up (least host memory per rank).
    """

    max_steps: int | None = None
    epochs: int | None = None
    precision: str = "auto"
    strategy: str = "none"
    zero_stage: int = 3
    activation_checkpointing: bool = False
    compile: bool = False
    val_every: int = 0
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    freeze_backbone: bool = False
    freeze_decoder: bool = False
    best_metric_name: str | None = None
    best_mode_name: str | None = None
    adapter_only: bool | None = None
    reshard_after_forward: bool = True
    build_on_rank0: bool = True

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> LoopConfig:
        """Parse and check the ``train:`` section.

        Raises:
            LoopConfigError: unknown key or impossible value, naming the key.
        """
        renamed = {"best_metric": "best_metric_name", "best_mode": "best_mode_name"}
        known = {f.name for f in fields(cls)} - set(renamed.values()) | set(renamed) | _LAUNCHER_KEYS
        unknown = sorted(set(section) - known)
        if unknown:
            raise LoopConfigError(f"train section has unknown keys {unknown}; allowed: {sorted(known)}")
        kwargs = {renamed.get(k, k): v for k, v in section.items() if k not in _LAUNCHER_KEYS}
        cfg = cls(**kwargs)
        if not cfg.max_steps and not cfg.epochs:
            raise LoopConfigError("train needs max_steps (optimizer steps) or epochs; set e.g. train.max_steps: 1000")
        for key in ("max_steps", "epochs", "val_every", "ckpt_every", "keep_last", "log_every"):
            value = getattr(cfg, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise LoopConfigError(f"train.{key} must be an integer >= 0, got {value!r}")
        for key in ("ckpt_every", "log_every", "keep_last"):
            if getattr(cfg, key) == 0:
                raise LoopConfigError(f"train.{key} must be >= 1, got 0")
        if cfg.zero_stage not in (2, 3):
            raise LoopConfigError(f"train.zero_stage must be 2 or 3, got {cfg.zero_stage!r}")
        if cfg.best_mode_name not in (None, "max", "min"):
            raise LoopConfigError(f"train.best_mode must be 'max' or 'min', got {cfg.best_mode_name!r}")
        return cfg

    def best_metric(self, task: str) -> str:
        """The metric that picks the best checkpoint."""
        return self.best_metric_name or _BEST_DEFAULTS[task][0]

    def best_mode(self, task: str) -> str:
        """``max`` or ``min`` for :meth:`best_metric` (errors and losses are minimised)."""
        if self.best_mode_name:
            return self.best_mode_name
        metric = self.best_metric(task)
        return "min" if any(word in metric for word in ("loss", "rmse", "mae")) else "max"

    def strategy_options(self, model_section: Mapping[str, Any], data_section: Mapping[str, Any],
                         grad_accum: int, world_size: int) -> dict[str, Any]:
        """Constructor options for ``make_strategy(self.strategy, ...)``."""
        adapter_only = self.adapter_only if self.adapter_only is not None else model_section.get("peft_config") is not None
        opts: dict[str, Any] = {"adapter_only": bool(adapter_only)}
        if self.strategy == "fsdp":
            opts["reshard_after_forward"] = self.reshard_after_forward
            opts["build_on_rank0"] = self.build_on_rank0
        if self.strategy == "deepspeed":
            opts["zero_stage"] = self.zero_stage
            opts["micro_batch"] = int(data_section["global_batch_size"]) // (world_size * grad_accum)
        return opts


# ---------------------------------------------------------------------------------------------- randomness
def seed_everything(seed: int, rank: int | None = None) -> None:
    """Seed python, numpy and torch. ``rank=None``: the same stream on every rank (model init); a rank: a
    stream of its own (dropout and drop-path during training)."""
    s = int(seed) if rank is None else int(seed) * 1_000_003 + 7919 * (int(rank) + 1)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any] | None, *, same_world: bool, seed: int, rank: int, step: int) -> None:
    """Continue the saved RNG streams; when the world size changed (the checkpoint's per-rank streams no longer
    map onto ranks) derive fresh per-rank streams from the seed and step instead."""
    if state is None or not same_world:
        seed_everything(seed + 104_729 * step, rank=rank)
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- the model
def load_pretrained_weights(net: nn.Module) -> list[str]:
    """Load pretrained backbone weights still pending (encoders built on the meta device keep their source;
    built on a real device they loaded at construction). Returns what was loaded."""
    from encdec.models.backbones.prithvi_load import load_pretrained

    return load_pretrained(net)


def load_init_from(net: nn.Module, path: str) -> None:
    """Load a TerraTorch (Lightning ``.ckpt``) checkpoint or a plain state-dict file into the built model.

    Called after the build, the pretrained load and PEFT (TerraTorch's key names are mapped onto the PEFT-wrapped
    layout), before the trainable set and sharding.

    Raises:
        encdec.models.terratorch_ckpt.CheckpointReadError: missing or unreadable file, or no weights in it.
        encdec.models.terratorch_ckpt.CheckpointMismatch: the checkpoint's keys or shapes do not fit the model.
    """
    from encdec.models.terratorch_ckpt import load_terratorch_weights, read_checkpoint

    load_terratorch_weights(net, read_checkpoint(path))


def _is_peft(module: nn.Module) -> bool:
    return any(hasattr(m, "peft_config") for m in module.modules())


def freeze(net: nn.Module, *, freeze_backbone: bool, freeze_decoder: bool) -> tuple[int, int]:
    """Set the trainable set and return ``(trainable, total)`` parameter counts.

    Freezing a PEFT-wrapped backbone leaves it as PEFT set it (base frozen, adapters trainable): freezing it
    wholesale would silently freeze the adapters too.

    Raises:
        LoopConfigError: nothing is left to train.
    """
    encoder = getattr(net, "encoder", None)
    if freeze_backbone and encoder is not None and not _is_peft(encoder):
        encoder.requires_grad_(False)
    if freeze_decoder and getattr(net, "decoder", None) is not None:
        net.decoder.requires_grad_(False)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    if trainable == 0:
        raise LoopConfigError(
            "no parameter is trainable after train.freeze_backbone/freeze_decoder; unfreeze something "
            "(or give model.peft_config so adapters are trained)"
        )
    return trainable, total


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to ``device`` (no copy on the CPU)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- validation
def _placeholder(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A one-sample input of the recipe's shape, for a rank that has no validation batch at all."""
    channels = len(data_cfg.get("bands") or data_cfg.get("means") or [0] * 6)
    size = int(data_cfg.get("img_size", 224))
    frames = int(data_cfg.get("num_frames", 1))
    shape = (1, channels, size, size) if frames == 1 else (1, channels, frames, size, size)
    return {"image": torch.zeros(shape)}


def evaluate(strategy: Any, val_iter: Any, loss_fn: Any, *, task: str, num_classes: int | None,
             data_cfg: Mapping[str, Any]) -> dict[str, float]:
    """One pass over the validation split on every rank; metrics from all-reduced counts.

    Ranks run forward in lock-step: sharded models (FSDP2, ZeRO-3) gather weights inside forward, so a rank
    that has run out of batches keeps running throw-away forwards until every rank has.

    Returns:
        ``val/loss`` and the task's metrics, prefixed ``val/``.
    """
    from encdec.train.losses import target_of
    from encdec.train.metrics import LossMeter, all_reduce_sum, build_metrics

    meter = LossMeter(loss_fn)
    metrics = build_metrics(task, num_classes=num_classes, ignore_index=loss_fn.ignore_index)
    module = strategy.module
    was_training = module.training
    module.eval()
    spare: dict[str, Any] | None = None
    batches = iter(val_iter)
    try:
        with torch.no_grad():
            while True:
                raw = next(batches, None)
                if int(all_reduce_sum(torch.tensor([0.0 if raw is None else 1.0], dtype=torch.float64))) == 0:
                    break
                if raw is None:
                    spare = spare or to_device(_placeholder(data_cfg), strategy.device)
                    with strategy.autocast():
                        module(spare["image"])
                    continue
                batch = to_device(raw, strategy.device)
                spare = {"image": batch["image"][:1]}
                with strategy.autocast():
                    out = module(batch["image"], **{k: batch[k] for k in ("temporal_coords", "location_coords") if k in batch})
                meter.update(out, batch)
                metrics.update(out.output.float(), target_of(task, batch), valid=loss_fn.valid_mask(batch))
    finally:
        module.train(was_training)
    return {"val/loss": meter.compute(), **{f"val/{k}": v for k, v in metrics.compute().items()}}
