"""Numeric precision of a run: the autocast context, loss scaling, frozen weights in bf16.

Trainable parameters and optimizer state always stay fp32 (fp32 master weights); ``bf16``/``fp16`` only change
the dtype matmuls and convolutions run in. Frozen parameters (the backbone of a LoRA run) never receive updates,
so under bf16 they can be stored in bf16 once: autocast then finds them already in bf16 instead of re-casting
all of them on every forward (the main cost of TerraTorch's ``bf16-mixed`` on a CPU).

Resolving ``auto`` is ``encdec.config.resolve_precision`` (re-exported here), the rule the planner uses too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from encdec.config.names import PRECISIONS
from encdec.config.precision import PrecisionError, cpu_has_bf16, resolve_precision
from encdec.distributed.frozen_storage import (  # how frozen weights are stored: a strategy hook
    cast_frozen_weights,
    compute_dtype,
    skip_adapter_input_casts,
    store_for_autocast,
)

__all__ = [
    "PRECISIONS",
    "PrecisionError",
    "autocast",
    "compute_dtype",
    "cpu_has_bf16",
    "cast_frozen_weights",
    "gpu_has_bf16",
    "make_grad_scaler",
    "pin_fp32_matmuls",
    "resolve_precision",
    "skip_adapter_input_casts",
    "store_for_autocast",
]


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 (what ``resolve_precision``'s ``auto`` needs to know about a GPU)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


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
