"""The DeepSpeed JSON config of a run: a pure function of the recipe's values (no I/O, no DeepSpeed import).

Accumulation and clipping are DeepSpeed's own (``gradient_accumulation_steps``, ``gradient_clipping``); bf16/fp16
are its ``bf16``/``fp16`` sections (fp32 master weights in the ZeRO optimizer). ZeRO-3's buffer sizes come from the
model's largest sharding unit (``_stage3_sizes``); measured in benchmarks/README.md ("ZeRO-3 full fine-tune
memory").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from encdec.config.checks import check_int
from encdec.distributed.strategy import PRECISIONS, StrategyError, as_optim_section

if TYPE_CHECKING:
    from encdec.config import OptimSection

__all__ = ["DEFAULT_UNIT_NUMEL", "ZERO_STAGES", "deepspeed_config", "largest_unit_numel"]

ZERO_STAGES = (2, 3)
# a 300M ViT block (Prithvi-EO-2.0 300M: 12.6M parameters per block): the ZeRO-3 sizes for models without units
DEFAULT_UNIT_NUMEL = 12_600_000


def deepspeed_config(
    optim_cfg: OptimSection | Mapping[str, Any],
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
    check_int(grad_accum, "optim.grad_accum", error=StrategyError)
    check_int(micro_batch, "micro_batch", error=StrategyError,
              fix="data.global_batch_size must be a multiple of world size x optim.grad_accum")
    if grad_clip is not None and (not isinstance(grad_clip, (int, float)) or grad_clip < 0 or math.isnan(grad_clip)):
        raise StrategyError(f"optim.grad_clip must be a number >= 0 or null, got {grad_clip!r}")
    check_int(unit_numel, "unit_numel (parameters in the largest sharding unit)", optional=True, error=StrategyError)

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
        optim = as_optim_section(optim_cfg)
        if optim.name != "adamw":
            raise StrategyError(f"native_optimizer supports optim.name 'adamw' only, got {optim.name!r}")
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": float(optim.lr),
                "weight_decay": float(optim.weight_decay),
                "betas": [float(b) for b in optim.betas],
                "eps": float(optim.eps),
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
