"""Fixtures for the 2-process strategy tests: DeepSpeed's one-time C++ build and single-process references."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# the spawned ranks import helper modules from this folder by name
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """Build DeepSpeed's shared-memory comm op once per machine (~40 s; cached under ~/.cache/torch_extensions).

    DeepSpeed's torch backend loads it in every process; building it here first means the spawned ranks only
    load the cached library instead of racing to compile it inside a timed test.
    """
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Any]]:
    """``reference(model, steps, global_batch, grad_accum=1, precision="fp32")``: the single-process (strategy
    ``none``) run, computed once per session.

    The result holds ``losses``, ``norms``, ``state`` (final full state dict) and ``export`` (the consolidated
    safetensors file of the final model).
    """
    from _train_worker import train_run

    cache: dict[tuple[str, int, int, int, str], dict[str, Any]] = {}

    def get(model: str, steps: int, global_batch: int, grad_accum: int = 1, precision: str = "fp32") -> dict[str, Any]:
        key = (model, steps, global_batch, grad_accum, precision)
        if key not in cache:
            export = tmp_path_factory.mktemp("reference") / f"{model}.safetensors"
            spec = {"strategy": "none", "model": model, "steps": steps, "global_batch": global_batch,
                    "grad_accum": grad_accum, "precision": precision, "export": str(export)}
            cache[key] = {**train_run(0, 1, spec), "export": export}
        return cache[key]

    return get
