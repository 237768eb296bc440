"""``deepspeed``: DeepSpeed ZeRO stage 2 (optimizer state + gradients sharded) or 3 (parameters too).

The engine's JSON config comes from the pure function ``deepspeed_config``. Accumulation and clipping are
DeepSpeed's own (``gradient_accumulation_steps``, ``gradient_clipping``); bf16/fp16 are its ``bf16``/``fp16``
sections (fp32 master weights in the ZeRO optimizer). The optimizer is the loop's torch optimizer passed as a
client optimizer, so no DeepSpeed C++ optimizer (cpu_adam, fused_adam) is compiled; set ``native_optimizer=True``
to use DeepSpeed's own Adam instead. On CPU DeepSpeed picks its CPU accelerator and gloo by itself.

Checkpoints are DeepSpeed's own (``save_checkpoint``/``load_checkpoint``). Loading at another world size goes
through DeepSpeed's universal checkpoint format (``ds_to_universal``), converted once next to the checkpoint.

ZeRO-3 memory: its buffer sizes come from the model's largest sharding unit (``_stage3_sizes``), an fp32 run's
master partition shares the parameter partition's storage (``share_stage3_fp32_master``, working around a
DeepSpeed device comparison), and on CPU the gradient partition's pages go back to the OS between steps
(``release_grad_pages``). Measured in benchmarks/README.md ("ZeRO-3 full fine-tune memory").
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from encdec.distributed.strategy import PRECISIONS, Strategy, StrategyError

__all__ = ["DEFAULT_UNIT_NUMEL", "ZERO_STAGES", "DeepSpeedStrategy", "deepspeed_config", "largest_unit_numel", "release_grad_pages", "share_stage3_fp32_master"]

ZERO_STAGES = (2, 3)
DS_FORMAT = "deepspeed"
_TAG = "ds"
# a 300M ViT block (Prithvi-EO-2.0 300M: 12.6M parameters per block): the ZeRO-3 sizes for models without units
DEFAULT_UNIT_NUMEL = 12_600_000


def deepspeed_config(
    optim_cfg: Mapping[str, Any],
    *,
    zero_stage: int,
    precision: str,
    grad_accum: int,
    micro_batch: int,
    grad_clip: float | None,
    native_optimizer: bool = False,
    unit_numel: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for one run (pure: no I/O, no process group, no DeepSpeed import).

    Args:
        optim_cfg: the recipe's ``optim`` section; read only with ``native_optimizer`` (``lr``, ``weight_decay``,
            ``betas``, ``eps``; the learning rate is driven by the loop's schedule either way).
        zero_stage: 2 or 3 (``train.zero_stage``).
        precision: ``bf16`` | ``fp16`` | ``fp32``.
        grad_accum: micro-batches per optimizer step (``optim.grad_accum``).
        micro_batch: samples per rank per micro-batch (global batch / (world size x grad_accum)).
        grad_clip: maximum global gradient norm (``optim.grad_clip``); None or 0 disables clipping.
        native_optimizer: describe DeepSpeed's own AdamW in the config (compiles a C++ extension on first use)
            instead of receiving a client optimizer.
        unit_numel: parameters in the model's largest sharding unit (a transformer block; see
            ``sharding_units``). ZeRO-3's buffers are sized from it (``DEFAULT_UNIT_NUMEL`` when None).

    Returns:
        A dict to pass as ``deepspeed.initialize(config=...)``; DeepSpeed derives ``train_batch_size`` as
        micro_batch x grad_accum x world size.

    Raises:
        StrategyError: a value is out of range, naming the recipe field.
    """
    if zero_stage not in ZERO_STAGES:
        raise StrategyError(f"train.zero_stage must be one of {ZERO_STAGES} for strategy 'deepspeed', got {zero_stage!r}")
    if precision not in PRECISIONS:
        raise StrategyError(
            f"precision {precision!r} is not supported by strategy 'deepspeed'; use one of {', '.join(PRECISIONS)}"
        )
    for field, value in (("optim.grad_accum", grad_accum), ("micro_batch", micro_batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StrategyError(f"{field} must be a positive integer, got {value!r}")
    if grad_clip is not None and (not isinstance(grad_clip, (int, float)) or grad_clip < 0 or math.isnan(grad_clip)):
        raise StrategyError(f"optim.grad_clip must be a number >= 0 or null, got {grad_clip!r}")
    if unit_numel is not None and (not isinstance(unit_numel, int) or isinstance(unit_numel, bool) or unit_numel < 1):
        raise StrategyError(
            f"unit_numel (parameters in the largest sharding unit) must be a positive integer or None, got {unit_numel!r}"
        )

    zero: dict[str, Any] = {
        "stage": zero_stage,
        "contiguous_gradients": True,
        # overlapping communication with backward needs extra buffers and helps only with async (GPU) streams
        "overlap_comm": False,
        "reduce_scatter": True,
        "reduce_bucket_size": 50_000_000,
    }
    if zero_stage == 2:
        zero["allgather_bucket_size"] = 50_000_000
    else:
        zero.update(_stage3_sizes(DEFAULT_UNIT_NUMEL if unit_numel is None else unit_numel))
        # the consolidated weights are gathered by the strategy (full_state_dict), not at every save
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        zero["stage3_param_persistence_threshold"] = 10_000
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # torch's AdamW/SGD as client optimizers: DeepSpeed lists AdamW as tested, SGD is not on its list
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the loop logs
        "wall_clock_breakdown": False,
    }
    if native_optimizer:
        name = optim_cfg.get("name", "adamw")
        if name != "adamw":
            raise StrategyError(f"native_optimizer supports optim.name 'adamw' only, got {name!r}")
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": float(optim_cfg.get("lr", 1e-4)),
                "weight_decay": float(optim_cfg.get("weight_decay", 0.0)),
                "betas": [float(b) for b in optim_cfg.get("betas", (0.9, 0.999))],
                "eps": float(optim_cfg.get("eps", 1e-8)),
            },
        }
    return config


def _stage3_sizes(unit: int) -> dict[str, int]:
    """ZeRO-3's buffer and grouping sizes (elements) for a model whose largest sharding unit has ``unit`` params.

    DeepSpeed's defaults are sized for GPUs holding billions of parameters and measured more per-worker memory
    than DDP on a 300M model (benchmarks/strategy_memory.py). Each setting below bounds one transient buffer:

    - ``sub_group_size``: the optimizer steps one sub-group of this rank's flat fp32 partition at a time, and for
      each one flattens a copy of its gradients and lets torch's AdamW make two partition-sized temporaries
      (``exp_avg_sq.sqrt() / bias_correction``). The default (1e12: the whole partition) made those three copies
      of the whole partition at every step; one unit per sub-group bounds them to about 3 x unit elements.
    - ``reduce_bucket_size``: the gradient reduce bucket, allocated once (default 5e8 elements, 2 GB fp32).
    - ``stage3_max_live_parameters`` / ``stage3_max_reuse_distance``: free gathered weights after use, as
      FSDP2's reshard_after_forward does; the defaults (1e9) keep the whole model gathered from forward to
      backward. Two units let the next block be gathered while the current one is in use.
    - ``stage3_prefetch_bucket_size``: how much is gathered ahead.
    """
    return {
        "sub_group_size": unit,
        "reduce_bucket_size": unit,
        "stage3_prefetch_bucket_size": unit,
        "stage3_max_live_parameters": 2 * unit,
        "stage3_max_reuse_distance": 2 * unit,
    }


def largest_unit_numel(model: nn.Module) -> int | None:
    """Parameters in the model's largest sharding unit (``model.sharding_units()``), or None without units."""
    units = getattr(model, "sharding_units", None)
    if not callable(units):
        return None
    sizes = [sum(p.numel() for p in unit.parameters()) for unit in units()]
    return max(sizes) if sizes and max(sizes) > 0 else None


def share_stage3_fp32_master(zero_optimizer: Any) -> int:
    """Let ZeRO-3's fp32 master partition be this rank's parameter partition when both are fp32; returns bytes freed.

    DeepSpeed (0.19) means to skip the separate master copy when the partition is already in the master dtype
    (``_create_fp32_partitions``: "we don't need another copy of the weights"), but it tests
    ``tensor.device == self.device`` with ``self.device`` a string ('cpu', 'cuda:0'), which a ``torch.device``
    never equals: every fp32 run kept a second copy of its partition (1/world of the model, 0.6 GiB per worker for
    the 300M at 2 workers). Every later write between the two is an in-place ``copy_`` (after each sub-group's
    step, checkpoint loads), which is a no-op on shared storage, so aliasing them is what DeepSpeed's own branch
    does. Skipped with offloading/NVMe swapping, for bf16/fp16 partitions, and once optimizer state exists.
    """
    masters = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    partitions = getattr(zero_optimizer, "fp16_partitioned_groups_flat", None)
    if not masters or not partitions or len(masters) != len(partitions):
        return 0
    if getattr(zero_optimizer, "offload_optimizer", False) or getattr(zero_optimizer, "swap_optimizer", False):
        return 0
    inner = getattr(zero_optimizer, "optimizer", None)
    state = getattr(inner, "state", {})
    freed = 0
    for master, part in zip(masters, partitions):
        if part is None or master.data_ptr() == part.data_ptr() or state.get(master):
            continue
        if master.dtype != part.dtype or master.device != part.device or master.shape != part.shape:
            continue
        master.data = part.data  # same Python object: the optimizer and DeepSpeed's lists keep their references
        freed += part.numel() * part.element_size()
    return freed


def release_grad_pages(zero_optimizer: Any) -> int:
    """Zero ZeRO-3's flat gradient partition and hand its pages back to the OS (CPU, Linux); returns bytes released.

    ZeRO-3 keeps one flat fp32 buffer for this rank's gradient partition (``grad_partitions_flat_buffer``, 1/world
    of the model) allocated for the whole run, while FSDP2 and DDP free gradients after the step. Between the
    optimizer step and the next backward its contents are dead (the next backward overwrites every gradient it
    produces), so ``madvise(MADV_DONTNEED)`` drops its pages: they read as zeros and come back on first write,
    during backward, when the activations that peak at the end of forward are being freed. The partial pages at
    both ends are zeroed so the whole buffer reads zero (a parameter without a gradient gets a zero one, as after
    ``zero_grad``). No-op for device memory or when the buffer is missing.
    """
    buf = getattr(zero_optimizer, "grad_partitions_flat_buffer", None)
    if not isinstance(buf, Tensor) or buf.device.type != "cpu" or not sys.platform.startswith("linux"):
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = buf.data_ptr()
    nbytes = buf.numel() * buf.element_size()
    lo = -(-start // page) * page
    hi = (start + nbytes) // page * page
    if hi - lo < 16 * page or (lo - start) % buf.element_size() or (hi - start) % buf.element_size():
        buf.zero_()
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontneed = 4
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), madv_dontneed) != 0:
        buf.zero_()  # the kernel refused: keep the pages, same contents
        return 0
    flat = buf.view(-1)
    flat[: (lo - start) // buf.element_size()].zero_()
    flat[(hi - start) // buf.element_size():].zero_()
    return hi - lo


def _ensure_process_group() -> None:
    """DeepSpeed always needs a process group: make a 1-rank gloo/NCCL group when none is described."""
    import torch.distributed as dist

    from encdec.distributed.process_group import find_free_port, init_process_group

    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(
            {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port()), "RANK": "0", "WORLD_SIZE": "1",
             "LOCAL_RANK": "0"}
        )
    init_process_group()


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
        optim_cfg: Mapping[str, Any],
        *,
        precision: str,
        grad_accum: int,
        activation_checkpointing: bool,
    ) -> None:
        """See ``Strategy.setup``; DeepSpeed converts the model to bf16/fp16 itself when asked."""
        self._check_setup_args(model, precision, grad_accum)
        _ensure_process_group()
        import deepspeed

        from encdec.distributed.torch_common import apply_activation_checkpointing

        if activation_checkpointing:
            apply_activation_checkpointing(model)
        model = model.to(self.device)
        clip = optim_cfg.get("grad_clip")
        self.grad_clip = float(clip) if clip else None
        config = deepspeed_config(
            optim_cfg,
            zero_stage=self.zero_stage,
            precision=precision,
            grad_accum=grad_accum,
            micro_batch=self.micro_batch,
            grad_clip=self.grad_clip,
            native_optimizer=self.native_optimizer,
            unit_numel=largest_unit_numel(model),
        )
        client_opt = None if self.native_optimizer else self.optimizer_factory(model, optim_cfg)
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
        """``engine.backward`` (scales by 1/grad_accum); non-final micro-batches advance DeepSpeed's counter."""
        engine = self.model
        engine.backward(loss)  # type: ignore[operator]
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
        from encdec.train.checkpoint import atomic_checkpoint_dir, save_extra

        meta = self._checkpoint_meta(DS_FORMAT, extra.get("step"), zero_stage=self.zero_stage)
        with atomic_checkpoint_dir(ckpt_dir, rank=self.rank, barrier=self.barrier, meta=meta) as tmp:
            self.model.save_checkpoint(  # type: ignore[operator]
                str(tmp / "state"),
                tag=_TAG,
                client_state={},
                save_latest=False,
                exclude_frozen_parameters=self.adapter_only,
            )
            save_extra(tmp, self.rank, extra)
            if self.rank == 0:
                torch.save(self._group_hparams(), tmp / "param_groups.pt")

    def _group_hparams(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def load(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """Restore engine state; another world size goes through a universal checkpoint (made once)."""
        from encdec.train.checkpoint import CheckpointError, load_extra, read_meta

        ckpt_dir = Path(ckpt_dir)
        meta = read_meta(ckpt_dir)
        if meta.get("format") != DS_FORMAT:
            raise CheckpointError(
                f"checkpoint {str(ckpt_dir)!r} was written by strategy {meta.get('strategy')!r} (format "
                f"{meta.get('format')!r}); strategy 'deepspeed' reads DeepSpeed checkpoints. Resume with the strategy "
                "that wrote it"
            )
        adapter_only = bool(meta.get("adapter_only", False))
        engine = self.model
        if int(meta["world_size"]) == self.world_size and int(meta.get("zero_stage", self.zero_stage)) == self.zero_stage:
            load_dir = ckpt_dir / "state"
        else:
            load_dir = self._universal_dir(ckpt_dir)
        universal = load_dir != ckpt_dir / "state"
        previous = engine._config.load_universal_checkpoint  # type: ignore[union-attr]
        engine._config.load_universal_checkpoint = universal  # type: ignore[union-attr]
        try:
            path, _ = engine.load_checkpoint(  # type: ignore[operator]
                str(load_dir),
                tag=_TAG,
                load_module_strict=not adapter_only,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        finally:
            engine._config.load_universal_checkpoint = previous  # type: ignore[union-attr]
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
        return load_extra(ckpt_dir, self.rank, self.world_size)

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
