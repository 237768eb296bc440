"""The one training recipe every worker runs, readable top to bottom in ``train``.

Build order (each step needs the previous one; steps 1-5 are ``encdec.train.build.build_run_model``, the builder
export, the plan and the ``--init-from`` check use too):

1. build the model with the run seed: on the CPU (every rank builds the same initial weights; FSDP2 and ZeRO-3
   keep each rank's own slice of them, so they must agree), or, where the strategy fills the shards from rank 0
   at set-up (``strategy.meta_build``: FSDP2's ``build_on_rank0``), on the meta device on every other rank;
2. load pretrained backbone weights (into the fused qkv layout they were saved in...
3. ...which ``build_model`` already split into q/k/v, and 4. wrapped with PEFT when ``peft_config`` is given:
   ``load_pretrained`` maps the checkpoint's keys onto that layout); then ``init_from`` (a TerraTorch checkpoint,
   mapped onto the same layout) unless resuming, where the checkpoint holds the weights;
5. decide the trainable set (``train.freeze_backbone`` / ``freeze_decoder``, never freezing PEFT adapters) and
   check it (``encdec.models.peft.set_trainable``: the freeze trap of frozen adapters fails here);
6. precision storage (bf16: frozen weights stored in bf16 once), 7. activation checkpointing (in
   ``strategy.setup``, before sharding), 8. optional ``torch.compile`` of each sharding unit;
9. shard (``strategy.setup``) and 10. build the optimizer over trainable parameters after sharding;
11. the loop: ``grad_accum`` micro-batches, clip, step, LR schedule, log, validate, checkpoint.

Loss normalisation: the loss of a global step is the mean over every valid target of the global batch, however
it is split across ranks and micro-batches (``encdec.train.losses``). Before the first backward of a step the
ranks all-reduce the step's normalisers (one small collective, which also carries the stop request); each
micro-batch then backpropagates ``sum / global_normaliser`` as it is: the strategies neither divide by
``grad_accum`` nor average over ranks (``Strategy.backward``), so the gradients add up to the global batch's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from encdec.config import DataSection, LossSection, ModelSection, OptimSection, TrainSection
from encdec.train.loop_parts import (
    capture_rng,
    evaluate,
    restore_rng,
    seed_everything,
    strategy_options,
    to_device,
    validation_decisions,
)

__all__ = ["train"]

LOG = logging.getLogger("encdec.train")


def train(
    *,
    task: str,
    model: ModelSection,
    loss: LossSection,
    data: DataSection,
    optim: OptimSection,
    train: TrainSection,
    seed: int,
    run_dir: str,
    resume: str | None = None,
    report: Callable[[dict[str, Any], str | None], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Train a model as the recipe describes; every rank of the job calls this.

    Args:
        task: ``segmentation`` | ``regression`` | ``classification`` | ``scalar_regression``.
        model: the recipe's ``model:`` section (``build_model`` keyword arguments).
        loss: the ``loss:`` section (``encdec.train.losses``).
        data: the ``data:`` section (``encdec.data.build_iterator``).
        optim: the ``optim:`` section (``encdec.train.optim``; ``grad_clip``, ``grad_accum``).
        train: the ``train:`` section (length, precision, strategy, intervals, freezing).
        seed: run seed (model init, data order, augmentation).
        run_dir: this run's directory (shared by all ranks); checkpoints go to ``<run_dir>/checkpoints`` and rank
            0 appends every report to ``<run_dir>/metrics.jsonl``.
        resume: a checkpoint directory, or a run directory whose latest complete checkpoint to continue from.
        report: called on every rank with ``(metrics, checkpoint_dir or None)`` at each log step and checkpoint.
        stop_requested: polled once per step; when it returns True on any rank, all ranks checkpoint and return.
        init_from: a TerraTorch (Lightning) checkpoint or plain state-dict file to start from (after the pretrained
            backbone weights and PEFT, before sharding); ignored when resuming (the checkpoint wins), except from an
            adapter-only checkpoint, whose frozen weights it supplies again (so pass it on resume too).

    Returns:
        The last metrics reported (train and, if there was validation, val), with ``step`` and ``checkpoint``.
    """
    import torch.distributed as dist

    from encdec.data import build_iterator
    from encdec.distributed import init_process_group, make_strategy
    from encdec.models.peft import parameter_report
    from encdec.train.build import build_run_model
    from encdec.train.checkpoint import CheckpointManager
    from encdec.train.losses import build_loss
    from encdec.train.metrics import all_reduce_sum
    from encdec.train.optim import lr_at, set_lr
    from encdec.train.precision import gpu_has_bf16, pin_fp32_matmuls, resolve_precision

    cfg = train
    grad_accum = optim.grad_accum
    max_norm = optim.grad_clip
    from encdec.train.early_stop import EarlyStopper
    from encdec.train.plateau import PlateauScheduler

    stopper = EarlyStopper(train.early_stop) if train.early_stop is not None else None
    plateau = (PlateauScheduler(optim.plateau, lr=optim.lr, min_lr=optim.min_lr)
               if optim.schedule == "plateau" and optim.plateau is not None else None)
    loss_fn = build_loss(task, loss)  # before anything heavy: a bad loss section fails in a second
    run_path = Path(run_dir)

    # -- process group and strategy -----------------------------------------------------------------------
    init_process_group(timeout_s=train.pg_timeout_s)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    strategy = make_strategy(cfg.strategy, **strategy_options(
        cfg, peft=model.peft_config is not None, global_batch_size=data.global_batch_size, grad_accum=grad_accum,
        world_size=world))
    rank, world = strategy.rank, strategy.world_size
    precision = resolve_precision(cfg.precision, strategy.device, gpu_bf16=gpu_has_bf16(strategy.device))
    lowered = pin_fp32_matmuls(precision)
    if lowered and rank == 0:
        LOG.warning("fp32 matmul precision was %r (set by an import); reset to 'highest' for precision fp32", lowered)

    # a checkpoint to resume from wins over init_from, so it is found before the build; an adapter-only one holds
    # no frozen weights, which then come from init_from again (as they did in the run that wrote it)
    resume_from = _resume_dir(resume)
    use_init = bool(init_from) and (resume_from is None or _adapter_only(resume_from))
    if init_from and not use_init and rank == 0:
        LOG.info("init_from=%s ignored: resuming from %s, whose weights win", init_from, resume_from)

    # -- 1-5. build, load pretrained, (split qkv + PEFT inside build_model), init_from, trainable set -----------
    seed_everything(seed)
    with strategy.build_context():  # the meta device on ranks whose shards setup() fills from rank 0
        net = build_run_model(task, model, cfg, weights=not strategy.meta_build,
                              init_from=str(init_from) if use_init else None)
    if use_init and not strategy.meta_build and rank == 0:
        LOG.info("initialised from %s%s", init_from, " (frozen weights; the rest from the checkpoint)"
                 if resume_from is not None else "")
    trainable, total = parameter_report(net)["total"]
    # -- 6. precision storage: frozen weights never change, so the strategy may store them in the compute dtype
    # once (none/ddp under autocast; FSDP2's mixed-precision policy and DeepSpeed's bf16 mode do it themselves)
    strategy.store_frozen_weights(net, precision)
    # -- 8. compile each sharding unit in place (names and state-dict keys stay the same) ---------------------
    if cfg.compile:
        for unit in net.sharding_units():  # type: ignore[operator]
            unit.compile()
    # -- 7, 9, 10. activation checkpointing, shard, optimizer over trainable parameters ------------------------
    strategy.setup(net, optim, precision=precision, grad_accum=grad_accum,
                   activation_checkpointing=cfg.activation_checkpointing)
    if rank == 0:
        LOG.info("model: %s trainable of %s parameters; strategy %s x%d; precision %s; grad_accum %d",
                 f"{trainable:,}", f"{total:,}", cfg.strategy, world, precision, grad_accum)

    # -- data, checkpoints, resume ------------------------------------------------------------------------------
    train_iter = build_iterator(data, split="train", rank=rank, world_size=world, grad_accum=grad_accum, seed=seed,
                                run_dir=run_dir)
    val_iter = (build_iterator(data, split="val", rank=rank, world_size=world, grad_accum=1, seed=seed,
                               run_dir=run_dir)
                if data.val is not None and cfg.val_every else None)
    max_steps = cfg.max_steps or (cfg.epochs or 1) * train_iter.steps_per_epoch
    ckpts = CheckpointManager(run_path / "checkpoints", keep_last=cfg.keep_last,
                              best_metric=cfg.best_metric_for(task), best_mode=cfg.best_mode_for(task))
    step = 0
    if rank == 0:
        ckpts.cleanup_partial()
    if resume_from is not None:
        extra = strategy.load(resume_from)
        step = int(extra["step"])
        train_iter.load_state_dict(extra["data"])
        ckpts.restore_best(extra, strategy)  # the best so far, from the checkpoint itself (not best.json)
        if stopper is not None:  # the patience count survives resume
            stopper.load_state_dict(extra.get("early_stop"))
        if plateau is not None:  # so do the plateau's count and the reductions made so far
            plateau.load_state_dict(extra.get("plateau"))
        restore_rng(extra.get("rng"), same_world=extra.get("world_size") == world, seed=seed, rank=rank, step=step)
        if rank == 0:
            LOG.info("resumed from %s at step %d", resume_from, step)
    else:
        seed_everything(seed, rank=rank)  # dropout/drop-path streams differ per rank

    def emit(metrics: dict[str, Any], ckpt: Path | None = None) -> None:
        if rank == 0:
            with open(run_path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if report is not None:
            report(dict(metrics), str(ckpt) if ckpt is not None else None)

    def save(metrics: Mapping[str, float] | None = None, data_state: dict[str, Any] | None = None) -> Path:
        extra = {"data": data_state or train_iter.state_dict(), "rng": capture_rng(), "world_size": world,
                 "early_stop": stopper.state_dict() if stopper is not None else None,
                 "plateau": plateau.state_dict() if plateau is not None else None}
        return ckpts.save(strategy, step, extra, metrics)

    # -- the loop -------------------------------------------------------------------------------------------------
    run_path.mkdir(parents=True, exist_ok=True)
    batches: Iterator[dict[str, Any]] = iter(train_iter)
    last: dict[str, Any] = {"step": step}
    last_ckpt: Path | None = None
    window = _Window()
    data_state = train_iter.state_dict()
    stopped = False
    strategy.model.train()
    while step < max_steps:
        # a global step's micro-batches are read first: their normalisers are needed before the first backward
        data_state = train_iter.state_dict()  # the position to resume from if this step is not taken
        t0 = time.perf_counter()
        micro = [to_device(next(batches), strategy.device) for _ in range(grad_accum)]
        window.wait += time.perf_counter() - t0
        local_norms = torch.stack([loss_fn.normalizers(b) for b in micro]).sum(dim=0)
        stop_flag = torch.tensor([1.0 if stop_requested is not None and stop_requested() else 0.0], dtype=torch.float64)
        shared = all_reduce_sum(torch.cat([local_norms, stop_flag]))
        if shared[-1] > 0:  # any rank was asked to stop: all checkpoint this position and return together
            stopped = True
            break
        norms = shared[:-1]
        plateau_lr = plateau.lr if plateau is not None else None
        set_lr(strategy.optimizer, lr_at(step, optim, max_steps, plateau_lr=plateau_lr))
        step_loss = torch.zeros(1, dtype=torch.float64)
        for i, batch in enumerate(micro):
            with strategy.no_sync(is_last_micro=i == grad_accum - 1):
                with strategy.autocast():
                    out = strategy.model(batch["image"], **_encoder_kwargs(batch))
                part = loss_fn.combine(loss_fn.sums(out, batch), norms)
                strategy.backward(part)  # already normalised for the global batch: no strategy rescales it
            step_loss += part.detach().double().cpu()
        grad_norm = strategy.step(max_norm)
        step += 1
        window.loss += step_loss
        window.steps += 1

        if step % cfg.log_every == 0 or step == max_steps:
            elapsed = time.perf_counter() - window.start
            loss_sum = float(all_reduce_sum(window.loss.clone()))  # each rank holds its share of every loss
            skips = [it.bad_tiles for it in (train_iter, val_iter) if it is not None]  # this rank's, per split
            bad, empty = all_reduce_sum(torch.tensor([sum(s["total"] for s in skips), sum(s["empty"] for s in skips)],
                                                     dtype=torch.float64)).tolist()
            last = {
                "step": step,
                "epoch": train_iter.state_dict()["epoch"],
                "train/loss": loss_sum / window.steps,
                "train/lr": lr_at(step - 1, optim, max_steps, plateau_lr=plateau_lr),
                "train/grad_norm": grad_norm,
                "train/tiles_per_s": window.steps * data.global_batch_size / elapsed,
                "train/data_wait_pct": 100.0 * window.wait / elapsed,
                "train/step_time_s": elapsed / window.steps,
                "data/bad_tiles": int(bad),  # skipped (all ranks, train + val; listed in skipped_tiles.csv)
                "data/empty_tiles": int(empty),
            }
            if rank == 0:
                LOG.info("step %d/%d loss %.5f lr %.3g tiles/s %.1f data-wait %.0f%%", step, max_steps,
                         last["train/loss"], last["train/lr"], last["train/tiles_per_s"], last["train/data_wait_pct"])
            emit(last)
            window = _Window()

        val: dict[str, float] = {}
        if val_iter is not None and (step % cfg.val_every == 0 or step == max_steps):
            val = evaluate(strategy, val_iter, loss_fn, task=task, num_classes=model.num_classes, data=data)
            last = {**last, **val, "step": step}
            if rank == 0:
                LOG.info("step %d val %s", step, {k: round(v, 5) for k, v in val.items() if not k.startswith("val/IoU_")})
        # a collective decision (a best step is saved off the ckpt_every grid): from the all-reduced metrics and
        # the in-memory best, the same on every rank; never from best.json, which a rank may read stale
        is_best = ckpts.is_best(val)
        # early stop and the plateau LR: every rank saw the same all-reduced val metrics; the flags are all-reduced
        # all the same. A lowered LR applies from the next step on (it is part of the checkpoint saved below).
        early, lr_lowered = validation_decisions(val, stopper, plateau, world)
        if lr_lowered and rank == 0:
            LOG.info("step %d: %s has not improved for %d validations; LR lowered to %.3g", step,
                     plateau.cfg.metric, plateau.cfg.patience + 1, plateau.lr)  # type: ignore[union-attr]
        if early:
            last = {**last, "status": "early-stopped"}
            if rank == 0:
                LOG.info("early stop at step %d: %s has not improved for %d validations (best %s)", step,
                         stopper.cfg.metric, stopper.bad, stopper.best)  # type: ignore[union-attr]
        if step % cfg.ckpt_every == 0 or step == max_steps or is_best or early:
            last_ckpt = save(val or None)
            emit({**last, "checkpoint": str(last_ckpt)}, last_ckpt)
        elif val:
            emit(last)
        if early:
            break

    if stopped and (last_ckpt is None or ckpts.path_for(step) != last_ckpt):
        last_ckpt = save(data_state=data_state)
        emit({**last, "step": step, "stopped": True, "checkpoint": str(last_ckpt)}, last_ckpt)
    train_iter.close()
    if val_iter is not None:
        val_iter.close()
    strategy.barrier()
    return {**last, "step": step, "checkpoint": str(last_ckpt) if last_ckpt else None, "stopped": stopped,
            "best": ckpts.best_record}


@dataclass
class _Window:
    """What the loop accumulates between two log steps."""

    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    steps: int = 0
    wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)


def _resume_dir(resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``resume`` itself when it is a complete checkpoint, else the latest
    complete one under ``<resume>/checkpoints``.

    Raises:
        FileNotFoundError: ``resume`` is given and is neither.
    """
    from encdec.train.checkpoint import find_latest_checkpoint, is_complete

    if not resume:
        return None
    candidate = Path(resume)
    found = candidate if is_complete(candidate) else find_latest_checkpoint(candidate / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"resume={resume!r} is neither a complete checkpoint nor a run directory with one")
    return found


def _adapter_only(ckpt: Path) -> bool:
    from encdec.train.checkpoint import read_meta

    return bool(read_meta(ckpt).get("adapter_only", False))


def _encoder_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Coordinates the data carries go to encoders that take them (Prithvi ``_tl``)."""
    return {k: batch[k] for k in ("temporal_coords", "location_coords") if k in batch}
