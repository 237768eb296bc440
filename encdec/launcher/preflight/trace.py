"""Counting and tracing on the meta device: parameters per part, and the tensors a training forward saves for
backward (per activation-checkpointing unit), which the plan's memory model turns into bytes per worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from encdec.launcher.recipe.schema import Recipe
    from encdec.models.peft import PartCount

__all__ = ["ActivationTrace", "count_parts", "input_shape_of", "trace_activations"]


@dataclass
class ActivationTrace:
    """What a training forward saves for backward, in bytes at fp32."""

    total: int
    per_unit: list[int]
    unit_inputs: list[int]
    float_fraction: float
    output_shape: tuple[int, ...]


# ----------------------------------------------------------------------------------------------- counting
def count_parts(model: nn.Module) -> dict[str, PartCount]:
    """Parameters per part (``encdec.models.peft.parameter_report``, the one counter): backbone-base (the
    encoder without its adapters), adapters, neck, decoder, head, aux_heads; empty optional parts left out."""
    from encdec.models.peft import parameter_report

    report = parameter_report(model)
    keep = ("backbone-base", "decoder", "head")
    return {part: c for part, c in report.items() if part != "total" and (c.total or part in keep)}


def input_shape_of(recipe: Recipe, batch: int) -> tuple[int, ...]:
    c, s, t = len(recipe.data.bands), recipe.data.img_size, recipe.data.num_frames
    return (batch, c, t, s, s) if t > 1 else (batch, c, s, s)


@contextlib.contextmanager
def _unit_tracker(units: list[nn.Module], state: dict[str, Any]) -> Iterator[None]:
    """Forward hooks that tell the saved-tensor hook which sharding unit is running and its input size."""
    import torch

    handles = []

    def pre(i: int) -> Any:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            state["stack"].append(i)
            state["inputs"][i] += sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))

        return hook

    def post(_mod: nn.Module, _args: Any, _out: Any) -> None:
        state["stack"].pop()

    for i, unit in enumerate(units):
        handles.append(unit.register_forward_pre_hook(pre(i)))
        handles.append(unit.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trace_activations(model: nn.Module, input_shape: tuple[int, ...], units: list[nn.Module]) -> ActivationTrace:
    """Run one training-mode forward on the meta device and sum the distinct storages saved for backward."""
    import torch

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    params |= {b.untyped_storage()._cdata for b in model.buffers()}
    saved: dict[int, tuple[int, int, bool]] = {}
    state: dict[str, Any] = {"stack": [], "inputs": [0] * len(units)}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params and key not in saved:
            unit = state["stack"][-1] if state["stack"] else -1
            saved[key] = (storage.nbytes(), unit, t.is_floating_point())
        return t

    model.train()
    x = torch.empty(input_shape, device="meta")
    with _unit_tracker(units, state), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    output = getattr(out, "output", out)
    per_unit = [0] * len(units)
    total = floats = 0
    for nbytes, unit, is_float in saved.values():
        total += nbytes
        floats += nbytes if is_float else 0
        if unit >= 0:
            per_unit[unit] += nbytes
    return ActivationTrace(total, per_unit, state["inputs"], floats / total if total else 1.0, tuple(output.shape))
