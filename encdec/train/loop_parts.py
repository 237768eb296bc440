"""The pieces ``encdec.train.loop.train`` is assembled from: strategy options, seeding and RNG state, device
placement and validation in lock-step across ranks. (The model is built by ``encdec.train.build``.)"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from encdec.config import DataSection, TrainSection

__all__ = [
    "capture_rng",
    "evaluate",
    "restore_rng",
    "seed_everything",
    "strategy_options",
    "to_device",
]

def strategy_options(train: TrainSection, *, peft: bool, global_batch_size: int, grad_accum: int,
                     world_size: int) -> dict[str, Any]:
    """Constructor options for ``make_strategy(train.strategy, ...)``.

    Args:
        train: the ``train:`` section.
        peft: whether the model has PEFT adapters (checkpoints then hold only trainable parameters by default).
        global_batch_size: ``data.global_batch_size`` (DeepSpeed needs the per-rank micro-batch).
        grad_accum: ``optim.grad_accum``.
        world_size: the number of ranks.
    """
    from encdec.train.optim import build_optimizer

    adapter_only = train.adapter_only if train.adapter_only is not None else peft
    opts: dict[str, Any] = {"adapter_only": bool(adapter_only), "optimizer_factory": build_optimizer,
                            "pg_timeout_s": float(train.pg_timeout_s)}
    if train.strategy == "fsdp":
        opts["reshard_after_forward"] = train.reshard_after_forward
        opts["build_on_rank0"] = train.build_on_rank0
    if train.strategy == "deepspeed":
        opts["zero_stage"] = train.zero_stage
        opts["micro_batch"] = global_batch_size // (world_size * grad_accum)
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


# ---------------------------------------------------------------------------------------------- batches
def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to ``device`` (no copy on the CPU)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- validation
def _placeholder(data: DataSection) -> dict[str, Any]:
    """A one-sample input of the recipe's shape, for a rank that has no validation batch at all."""
    channels, size, frames = len(data.bands), data.img_size, data.num_frames
    shape = (1, channels, size, size) if frames == 1 else (1, channels, frames, size, size)
    return {"image": torch.zeros(shape)}


def evaluate(strategy: Any, val_iter: Any, loss_fn: Any, *, task: str, num_classes: int | None,
             data: DataSection) -> dict[str, float]:
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
                    spare = spare or to_device(_placeholder(data), strategy.device)
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


def validation_decisions(val: Mapping[str, float], stopper: Any, plateau: Any, world: int) -> tuple[bool, bool]:
    """(stop now, LR lowered now) after a validation: ``train.early_stop`` and the plateau schedule.

    Every rank feeds the same all-reduced metrics to its own ``EarlyStopper`` / ``PlateauScheduler`` and so decides
    the same; one all-reduce of the two flags makes sure of it: any rank's stop stops every rank (none may leave the
    loop alone), and ranks that disagree on the LR (their replicas would drift apart) fail the run, on every rank.
    """
    from encdec.train.metrics import all_reduce_sum

    if not val or (stopper is None and plateau is None):
        return False, False
    flags = torch.tensor([float(stopper.update(val)) if stopper is not None else 0.0,
                          float(plateau.update(val)) if plateau is not None else 0.0], dtype=torch.float64)
    stop, lowered = all_reduce_sum(flags).tolist()
    if lowered and lowered != world:
        raise RuntimeError(f"ranks disagree on the plateau schedule ({lowered:g} of {world} lowered the LR) "
                           "though they saw the same all-reduced validation metrics; this is a bug, please report it")
    return stop > 0, lowered > 0
