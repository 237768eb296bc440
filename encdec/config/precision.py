"""The one rule that turns ``train.precision`` into a concrete precision, shared by the planner and the engine.

Pure Python (the planner calls it before torch picks a device): the caller says what the device is and, for a
GPU, whether it computes bf16.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from encdec.config.names import PRECISIONS

__all__ = ["PrecisionError", "cpu_has_bf16", "resolve_precision"]


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


def resolve_precision(precision: str, device: Any, *, gpu_bf16: bool = True) -> str:
    """Turn the recipe's ``train.precision`` into a concrete ``bf16`` / ``fp16`` / ``fp32``.

    Args:
        precision: ``auto`` | ``bf16`` | ``fp16`` | ``fp32``.
        device: the device the worker computes on: a ``torch.device`` or its type (``"cpu"``, ``"cuda"``).
        gpu_bf16: whether that GPU computes bf16 (``torch.cuda.is_bf16_supported()``); ``auto`` picks fp16 on a
            GPU without it. Ignored on a CPU, where the CPU flags decide.

    Raises:
        PrecisionError: unknown name, or ``fp16`` without a GPU (CPU autocast has no fp16 loss scaling path).
    """
    kind = str(getattr(device, "type", device))
    if precision not in PRECISIONS:
        raise PrecisionError(f"train.precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if kind == "cuda":
            return "bf16" if gpu_bf16 else "fp16"
        return "bf16" if kind == "cpu" and cpu_has_bf16() else "fp32"
    if precision == "fp16" and kind != "cuda":
        raise PrecisionError(
            f"train.precision 'fp16' needs a GPU (device is {kind}); use 'bf16' or 'fp32' on CPU "
            "(or 'auto', which picks bf16 where the CPU has AVX-512-BF16/AMX)"
        )
    return precision
