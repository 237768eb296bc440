"""``deepspeed``: DeepSpeed ZeRO stage 2 (optimizer state + gradients sharded) or 3 (parameters too).

The engine's JSON config comes from the pure function ``deepspeed_config`` (``deepspeed_config.py``); the
patches of DeepSpeed's private state, gated by version, are in ``deepspeed_patches.py``. The optimizer is the
loop's torch optimizer passed as a client optimizer, so no DeepSpeed C++ optimizer (cpu_adam, fused_adam) is
compiled; set ``native_optimizer=True`` to use DeepSpeed's own Adam instead. On CPU DeepSpeed picks its CPU
accelerator and gloo by itself.

DeepSpeed averages gradients over ranks and divides the loss by ``gradient_accumulation_steps``; the loop's losses
are already normalised for the global batch (``Strategy.backward``), so ``backward`` undoes both inside this
strategy (``scale_wrt_gas=False``, and the loss times the world size before ZeRO's 1/world pre-division).

Checkpoints are DeepSpeed's own (``save_checkpoint``/``load_checkpoint``). Loading at another world size goes
through DeepSpeed's universal checkpoint format (``ds_to_universal``), converted once next to the checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from encdec.distributed.deepspeed_config import DEFAULT_UNIT_NUMEL, ZERO_STAGES, deepspeed_config, largest_unit_numel
from encdec.distributed.deepspeed_patches import (
    release_grad_pages,
    share_stage3_fp32_master,
    universal_checkpoint_loading,
)
from encdec.distributed.ds_safe import check_deepspeed_checkpoint
from encdec.distributed.strategy import Strategy, StrategyError

if TYPE_CHECKING:
    from encdec.config import OptimSection

__all__ = [
    "DEFAULT_UNIT_NUMEL",
    "ZERO_STAGES",
    "DeepSpeedStrategy",
    "deepspeed_config",
    "init_deepspeed_comm",
    "largest_unit_numel",
    "release_grad_pages",
    "share_stage3_fp32_master",
]

DS_FORMAT = "deepspeed"
_TAG = "ds"


def _ensure_process_group(timeout_s: float) -> None:
    """DeepSpeed always needs a process group: a 1-rank gloo/NCCL group when none is described."""
    from encdec.distributed.process_group import ensure_process_group

    ensure_process_group(timeout_s=timeout_s)


def init_deepspeed_comm(timeout_s: float) -> None:
    """Set up DeepSpeed's communication backend on the existing process group with the recipe's timeout.

    ``deepspeed.initialize`` would otherwise create it with DeepSpeed's default timeout (``DEEPSPEED_TIMEOUT`` or
    30 min), which its own groups (ZeRO partitioning, all-gathers) then use; ZeRO-3 all-gather timeouts at scale
    are a common report. The torch process group itself was made with the same timeout (``init_process_group``).
    """
    import torch.distributed as dist
    from deepspeed import comm

    comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False,
                          timeout=datetime.timedelta(seconds=float(timeout_s)))


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO-2/3.

    Args:
        zero_stage: 2 or 3.
        micro_batch: per-rank micro-batch size (DeepSpeed's batch bookkeeping; does not change the maths).
        native_optimizer: let DeepSpeed build its own AdamW from ``optim_cfg`` (compiles a C++ extension).
        release_grad_pages: ZeRO-3 on CPU: hand the pages of the flat gradient partition back to the OS after
            each optimizer step (see ``release_grad_pages``); None = on for CPU devices.
        **kwargs: see ``Strategy``.
    """

    name = "deepspeed"

    def __init__(
        self,
        *,
        zero_stage: int = 3,
        micro_batch: int = 1,
        native_optimizer: bool = False,
        release_grad_pages: bool | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self._release_pages = release_grad_pages
        if zero_stage not in ZERO_STAGES:
            raise StrategyError(f"train.zero_stage must be one of {ZERO_STAGES} for strategy 'deepspeed', got {zero_stage!r}")
        self.zero_stage = zero_stage
        self.micro_batch = micro_batch
        self.native_optimizer = native_optimizer
        self.grad_clip: float | None = None

    @property
    def module(self) -> nn.Module:
        """The model inside the engine."""
        return self.model.module  # type: ignore[return-value]

    def setup(
        self,
        model: nn.Module,
        optim_cfg: OptimSection | Mapping[str, Any],
        *,
        precision: str,
        grad_accum: int,
        activation_checkpointing: bool,
    ) -> None:
        """See ``Strategy.setup``; DeepSpeed converts the model to bf16/fp16 itself when asked."""
        optim = self._check_setup_args(model, optim_cfg, precision, grad_accum)
        _ensure_process_group(self.pg_timeout_s)
        init_deepspeed_comm(self.pg_timeout_s)
        import deepspeed

        from encdec.distributed.torch_common import apply_activation_checkpointing

        if activation_checkpointing:
            apply_activation_checkpointing(model)
        model = model.to(self.device)
        self.grad_clip = float(optim.grad_clip) if optim.grad_clip else None
        config = deepspeed_config(
            optim,
            zero_stage=self.zero_stage,
            precision=precision,
            grad_accum=grad_accum,
            micro_batch=self.micro_batch,
            grad_clip=self.grad_clip,
            native_optimizer=self.native_optimizer,
            unit_numel=largest_unit_numel(model),
        )
        client_opt = None if self.native_optimizer else self._build_optimizer(model, optim)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, ds_opt, _, _ = deepspeed.initialize(
            model=model,
            optimizer=client_opt,
            model_parameters=trainable if client_opt is None else None,
            config=config,
            dist_init_required=False,
        )
        self._model = engine
        if self.zero_stage == 3:
            share_stage3_fp32_master(ds_opt)
        # the torch optimizer the ZeRO wrapper steps: the loop's LR schedule writes its param_groups
        inner = getattr(ds_opt, "optimizer", ds_opt)
        self._optimizer = inner if isinstance(inner, torch.optim.Optimizer) else ds_opt

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """bf16/fp16: the engine holds low-precision weights; autocast casts the fp32 inputs to match."""
        dtype = self._autocast_dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: Tensor) -> None:
        """``engine.backward`` of the already-normalised ``loss``; non-final micro-batches advance DeepSpeed's
        counter.

        DeepSpeed's own averaging is undone here: no 1/grad_accum (``scale_wrt_gas=False``) and the loss times the
        world size, which ZeRO's reduce divides by again (exact for power-of-two world sizes).
        """
        engine = self.model
        world = self.world_size
        engine.backward(loss * world if world > 1 else loss, scale_wrt_gas=False)  # type: ignore[operator]
        if not engine.is_gradient_accumulation_boundary():  # type: ignore[operator]
            engine.step()  # type: ignore[operator]  # only counts the micro-step

    def no_sync(self, is_last_micro: bool) -> contextlib.AbstractContextManager[None]:
        """ZeRO-2/3 reduce per micro-batch; this only checks the loop and DeepSpeed agree on the boundary."""
        boundary = bool(self.model.is_gradient_accumulation_boundary())  # type: ignore[operator]
        if boundary != bool(is_last_micro):
            raise StrategyError(
                f"the loop's micro-batch count disagrees with DeepSpeed's (is_last_micro={is_last_micro}, DeepSpeed "
                f"boundary={boundary}); call backward() once per micro-batch and step() once per {self.grad_accum}"
            )
        return contextlib.nullcontext()

    def step(self, max_norm: float | None) -> float:
        """The boundary ``engine.step()``: clip (configured at setup), step, zero grads; returns the grad norm."""
        want = float(max_norm) if max_norm else None
        if want != self.grad_clip:
            raise StrategyError(
                f"strategy 'deepspeed' clips at optim.grad_clip={self.grad_clip} (fixed in its config at setup), "
                f"but step() was asked for max_norm={max_norm}; pass optim.grad_clip"
            )
        engine = self.model
        engine.step()  # type: ignore[operator]
        release = self.device.type == "cpu" if self._release_pages is None else self._release_pages
        if release and self.zero_stage == 3:
            release_grad_pages(engine.optimizer)  # type: ignore[union-attr]
        if not engine.was_step_applied():  # type: ignore[operator]
            return math.inf  # fp16 overflow: DeepSpeed skipped the step and lowered the loss scale
        norm = engine.get_global_grad_norm()  # type: ignore[operator]
        if norm is None:
            return math.nan
        return float(norm.item() if isinstance(norm, Tensor) else norm)

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt_dir: str | Path, extra: Mapping[str, Any]) -> None:
        """DeepSpeed's sharded checkpoint (collective) inside an atomic directory; see ``Strategy.save``."""
        with self._writing(ckpt_dir, DS_FORMAT, extra, zero_stage=self.zero_stage) as tmp:
            self.model.save_checkpoint(  # type: ignore[operator]
                str(tmp / "state"),
                tag=_TAG,
                client_state={},
                save_latest=False,
                exclude_frozen_parameters=self.adapter_only,
            )
            if self.rank == 0:
                torch.save(self._group_hparams(), tmp / "param_groups.pt")

    def _group_hparams(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def load(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """Restore engine state; another world size goes through a universal checkpoint (made once)."""
        from encdec.distributed.ckpt_io import CheckpointError

        ckpt_dir = Path(ckpt_dir)
        meta = self._read_checkpoint_meta(ckpt_dir, DS_FORMAT, "deepspeed")
        adapter_only = bool(meta.get("adapter_only", False))
        engine = self.model
        # DeepSpeed (and its universal converter) unpickle with weights_only=False: check what they will read first
        check_deepspeed_checkpoint(ckpt_dir / "state" / _TAG)
        if int(meta["world_size"]) == self.world_size and int(meta.get("zero_stage", self.zero_stage)) == self.zero_stage:
            load_dir = ckpt_dir / "state"
        else:
            load_dir = self._universal_dir(ckpt_dir)
        universal = load_dir != ckpt_dir / "state"
        if universal:
            check_deepspeed_checkpoint(load_dir / _TAG)
        with universal_checkpoint_loading(engine, universal):
            path, _ = engine.load_checkpoint(  # type: ignore[operator]
                str(load_dir),
                tag=_TAG,
                load_module_strict=not adapter_only,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {str(load_dir)!r} (tag {_TAG!r})")
        if universal:
            # DeepSpeed's universal load copies param group 0's hyperparameters into every group (so the
            # no-weight-decay group would get weight decay): put back each group's own
            from encdec.models.safe_load import safe_torch_load
            saved = safe_torch_load(ckpt_dir / "param_groups.pt", stub_unknown=False, mmap=False)
            groups = self.optimizer.param_groups
            if len(saved) != len(groups):
                raise CheckpointError(
                    f"checkpoint {str(ckpt_dir)!r} has {len(saved)} optimizer parameter groups, this optimizer has "
                    f"{len(groups)}; resume with the same optim section and trainable set"
                )
            for group, hparams in zip(groups, saved):
                group.update(hparams)
            # ... and gives every group's state one shared ``step`` tensor, which torch's Adam increments in place
            # once per group: un-share it so each group's bias correction counts its own steps
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), Tensor):
                    state["step"] = state["step"].clone()
        return self._load_extra(ckpt_dir)

    def _universal_dir(self, ckpt_dir: Path) -> Path:
        """``<ckpt>/universal`` made by rank 0 with DeepSpeed's ``ds_to_universal`` (atomic, reused later)."""
        out = ckpt_dir / "universal"
        if self.rank == 0 and not (out / _TAG).is_dir():
            import argparse

            from deepspeed.checkpoint import ds_to_universal

            tmp = ckpt_dir / ".tmp-universal"
            shutil.rmtree(tmp, ignore_errors=True)
            args = argparse.Namespace(
                input_folder=str(ckpt_dir / "state" / _TAG),
                output_folder=str(tmp / _TAG),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                # ZeRO-1/2 checkpoints of non-Megatron models carry no universal_checkpoint_info (only TP/PP
                # layouts need one): let the converter add the plain data-parallel version tag
                inject_missing_state=True,
            )
            ds_to_universal.main(args)
            os.replace(tmp, out)
        self.barrier()
        return out

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """Full fp32 weights (the ZeRO masters for trainable ones) on rank 0; collective under ZeRO-3."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.module
        out: dict[str, Tensor] = {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:  # frozen (no fp32 master): gather the module's own copy
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.data.detach().clone()
            if self.rank == 0:
                out[name] = full.detach().float().cpu()
        for name, b in module.named_buffers():
            if self.rank == 0 and name.rsplit(".", 1)[-1] not in _non_persistent(module, name):
                out[name] = b.detach().cpu().float() if b.is_floating_point() else b.detach().cpu()
        self.barrier()
        return out if self.rank == 0 else None


def _non_persistent(module: nn.Module, buffer_name: str) -> set[str]:
    owner = module.get_submodule(buffer_name.rsplit(".", 1)[0]) if "." in buffer_name else module
    return set(getattr(owner, "_non_persistent_buffers_set", set()))
