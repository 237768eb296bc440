"""Numeric precision of a run: resolve ``auto``, the autocast context, loss scaling, frozen weights in bf16.

Trainable parameters and optimizer state always stay fp32 (fp32 master weights); ``bf16``/``fp16`` only change
the dtype matmuls and convolutions run in. Frozen parameters (the backbone of a LoRA run) never receive updates,
so under bf16 they can be stored in bf16 once: autocast then finds them already in bf16 instead of re-casting
all of them on every forward (the main cost of TerraTorch's ``bf16-mixed`` on a CPU).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "PrecisionError",
    "autocast",
    "compute_dtype",
    "cpu_has_bf16",
    "cast_frozen_weights",
    "make_grad_scaler",
    "pin_fp32_matmuls",
    "resolve_precision",
    "skip_adapter_input_casts",
    "store_for_autocast",
]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# Layers whose weights go through an autocast-listed op (linear / conv): storing their frozen weights in bf16
# is exactly what autocast would compute with anyway. Norm layers are left in fp32 (CPU layer_norm/group_norm
# are not all autocast-listed, and mixed input/weight dtypes would fail there).
_AUTOCAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class PrecisionError(ValueError):
    """The requested precision is unknown or not available on this hardware."""


@functools.lru_cache(maxsize=1)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX-512-BF16 or AMX), read from the kernel's CPU flags.

    Without those instructions bf16 is emulated and slower than fp32, so ``auto`` must not pick it.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn the recipe's ``train.precision`` into a concrete ``bf16`` / ``fp16`` / ``fp32``.

    Args:
        precision: ``auto`` | ``bf16`` | ``fp16`` | ``fp32``.
        device: the device the worker computes on.

    Raises:
        PrecisionError: unknown name, or ``fp16`` without a GPU (CPU autocast has no fp16 loss scaling path).
    """
    if precision not in PRECISIONS:
        raise PrecisionError(f"train.precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PrecisionError(
            f"train.precision 'fp16' needs a GPU (device is {device.type}); use 'bf16' or 'fp32' on CPU "
            "(or 'auto', which picks bf16 where the CPU has AVX-512-BF16/AMX)"
        )
    return precision


def pin_fp32_matmuls(precision: str) -> str | None:
    """Make ``fp32`` mean fp32: set ``torch.set_float32_matmul_precision("highest")`` and return the previous
    setting if it was lower (else None).

    The setting is global and any import may change it: importing TerraTorch runs
    ``torch.set_float32_matmul_precision("medium")``, which lets oneDNN compute fp32 matmuls in bf16 on CPUs with
    AMX/AVX-512-BF16 (and TF32/bf16 on recent GPUs). Reduced-precision matmuls are what ``bf16`` is for.
    """
    if precision != "fp32":
        return None
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    return previous if previous != "highest" else None


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in for a resolved precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast for ``bf16``/``fp16`` on ``device``; nothing for ``fp32``."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=compute_dtype(precision)):
        yield


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 on GPU (fp16 gradients underflow without one); ``None`` otherwise."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights of linear/conv layers in ``dtype`` once; returns how many parameters moved.

    Only parameters with ``requires_grad=False`` are cast, so trainable ones (and their optimizer state) stay
    fp32. Use this with :func:`autocast` of the same dtype: autocast then skips the per-step cast of those
    weights. Biases of the same layers go too (autocast casts them to the compute dtype as well).
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
    """Prepare a model that will run under :func:`autocast` (strategies ``none``/``ddp``): frozen linear/conv
    weights stored in the compute dtype once, adapter input casts skipped. A no-op for ``fp32``.

    Returns:
        ``{"frozen_cast": parameters moved, "adapters": adapter layers switched}``.
    """
    if precision == "fp32":
        return {"frozen_cast": 0, "adapters": 0}
    return {"frozen_cast": cast_frozen_weights(model, compute_dtype(precision)), "adapters": skip_adapter_input_casts(model)}
