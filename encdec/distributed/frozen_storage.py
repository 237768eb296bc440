"""How frozen weights are stored for a precision, for strategies that compute under ``torch.autocast``.

Trainable parameters and optimizer state always stay fp32 (fp32 master weights); ``bf16``/``fp16`` only change
the dtype matmuls and convolutions run in. Frozen parameters (the backbone of a LoRA run) never receive updates,
so under bf16 they can be stored in bf16 once: autocast then finds them already in bf16 instead of re-casting
all of them on every forward (the main cost of TerraTorch's ``bf16-mixed`` on a CPU). Strategies that manage
parameter dtypes themselves (FSDP2's mixed-precision policy, DeepSpeed's bf16 mode) leave the model as it is:
this is ``Strategy.store_frozen_weights``. ``encdec.train.precision`` re-exports these names.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["cast_frozen_weights", "compute_dtype", "skip_adapter_input_casts", "store_for_autocast"]

# Layers whose weights go through an autocast-listed op (linear / conv): storing their frozen weights in bf16
# is exactly what autocast would compute with anyway. Norm layers are left in fp32 (CPU layer_norm/group_norm
# are not all autocast-listed, and mixed input/weight dtypes would fail there).
_AUTOCAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in for a resolved precision (``bf16`` | ``fp16`` | ``fp32``)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights of linear/conv layers in ``dtype`` once; returns how many parameters moved.

    Only parameters with ``requires_grad=False`` are cast, so trainable ones (and their optimizer state) stay
    fp32. Use this with autocast of the same dtype: autocast then skips the per-step cast of those weights.
    Biases of the same layers go too (autocast casts them to the compute dtype as well).
    """
    moved = 0
    for module in model.modules():
        if not isinstance(module, _AUTOCAST_LAYERS):
            continue
        for param in module.parameters(recurse=False):
            if not param.requires_grad and param.dtype != dtype:
                # replace .data in place: the Parameter object (and any reference to it) stays the same
                param.data = param.data.to(dtype)
                moved += param.numel()
    return moved


def skip_adapter_input_casts(model: nn.Module) -> int:
    """Stop peft's adapter layers from casting their input up to the adapter's fp32 dtype; returns how many.

    Under autocast the input of a LoRA layer is bf16; peft casts it to fp32 (the adapter weights' dtype) and
    autocast casts it straight back to bf16 for the adapter matmul: two copies of the activation per adapter for
    the same result. ``cast_input_dtype_enabled`` is peft's own switch for this (``disable_input_dtype_casting``).
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "_cast_input_dtype"):  # peft's BaseTunerLayer
            setattr(module, "cast_input_dtype_enabled", False)  # noqa: B010  (nn.Module's __setattr__ is typed for tensors)
            count += 1
    return count


def store_for_autocast(model: nn.Module, precision: str) -> dict[str, int]:
    """Prepare a model that will run under autocast (strategies ``none``/``ddp``): frozen linear/conv weights
    stored in the compute dtype once, adapter input casts skipped. A no-op for ``fp32``.

    Returns:
        ``{"frozen_cast": parameters moved, "adapters": adapter layers switched}``.
    """
    if precision == "fp32":
        return {"frozen_cast": 0, "adapters": 0}
    return {"frozen_cast": cast_frozen_weights(model, compute_dtype(precision)), "adapters": skip_adapter_input_casts(model)}
