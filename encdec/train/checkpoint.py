"""Checkpoint bookkeeping shared by every strategy: naming, latest complete, last-k + best, export.

Layout of one run's checkpoints (``root`` is ``<run_dir>/checkpoints``)::

    root/step_00000010/          a complete checkpoint (see ``encdec.distributed.ckpt_io`` for its insides)
    root/.tmp-step_00000020/     being written; never picked up by ``find_latest_checkpoint``
    root/best.json               which step holds the best validation metric so far (for people and tools: the
                                 run itself keeps the best in memory and in each checkpoint's ``extra``)

The atomic-directory, ``meta.json`` and per-rank ``extra`` helpers live below both this module and the
strategies, in ``encdec.distributed.ckpt_io``; their names are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from encdec.distributed.ckpt_io import (
    META_FILE,
    OLD_PREFIX,
    TMP_PREFIX,
    CheckpointError,
    atomic_checkpoint_dir,
    is_complete,
    load_extra,
    read_meta,
    save_extra,
    write_json,
)

if TYPE_CHECKING:
    from encdec.distributed.strategy import Strategy

__all__ = [
    "BEST_FILE",
    "META_FILE",
    "TMP_PREFIX",
    "CheckpointError",
    "CheckpointManager",
    "atomic_checkpoint_dir",
    "export_consolidated",
    "find_latest_checkpoint",
    "is_complete",
    "list_checkpoints",
    "load_extra",
    "read_meta",
    "save_extra",
]

BEST_FILE = "best.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete ``step_*`` checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (half-written ones are ignored)."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Names, saves and prunes a run's checkpoints: the last ``keep_last`` plus the best by a validation metric.

    Which checkpoint is the best is a collective decision (a best step is saved even off the ``ckpt_every``
    grid), so it is taken from values every rank holds alike: the all-reduced validation metrics and the best so
    far kept in memory (restored on resume from the checkpoint's own ``extra``). ``best.json`` is written by rank 0
    for people and tools (``encdec-launch export``) and never read back by a running job: on a mounted bucket one
    stale read would make the ranks disagree and hang in the save.

    Args:
        root: directory holding the checkpoints (``<run_dir>/checkpoints``).
        keep_last: complete checkpoints to keep besides the best (>= 1).
        best_metric: metric name (a key of the ``metrics`` given to ``save``) that decides the best checkpoint;
            None keeps no best.
        best_mode: ``max`` (e.g. mIoU) or ``min`` (e.g. loss).
    """

    def __init__(
        self, root: str | Path, *, keep_last: int = 3, best_metric: str | None = None, best_mode: str = "max"
    ) -> None:
        if not isinstance(keep_last, int) or keep_last < 1:
            raise CheckpointError(f"keep_last must be an integer >= 1 (train.keep_last), got {keep_last!r}")
        if best_mode not in ("max", "min"):
            raise CheckpointError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._best: dict[str, Any] | None = None

    def path_for(self, step: int) -> Path:
        """The directory of the checkpoint at optimizer step ``step``."""
        return self.root / f"step_{int(step):08d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint."""
        return find_latest_checkpoint(self.root)

    @property
    def best_record(self) -> dict[str, Any] | None:
        """``{"step", "metric", "value"}`` of the best checkpoint this run knows of (memory only; same on every
        rank), or None."""
        return dict(self._best) if self._best is not None else None

    def best_info(self) -> dict[str, Any] | None:
        """``{"step", "metric", "value"}`` of the best checkpoint: the in-memory record, else ``best.json`` (for
        tools that open a finished run; a running job decides with :meth:`is_best`)."""
        return self.best_record if self._best is not None else self._read_best_file()

    def best(self) -> Path | None:
        """The complete checkpoint with the best ``best_metric`` so far (see :meth:`best_info`)."""
        info = self.best_info()
        if info is None:
            return None
        path = self.path_for(int(info["step"]))
        return path if is_complete(path) else None

    def is_best(self, metrics: Mapping[str, float] | None) -> bool:
        """Whether ``metrics`` (all-reduced validation metrics) improve on the best so far.

        Uses only values that are the same on every rank, so every rank takes the same (collective) decision.
        """
        if self.best_metric is None or not metrics or self.best_metric not in metrics:
            return False
        value = float(metrics[self.best_metric])
        if math.isnan(value):
            return False
        if self._best is None:
            return True
        best = float(self._best["value"])
        return value > best if self.best_mode == "max" else value < best

    def restore_best(self, extra: Mapping[str, Any], strategy: Strategy) -> dict[str, Any] | None:
        """Take the best so far from a resumed checkpoint's ``extra`` (collective when it has none).

        Checkpoints written before the best was kept in ``extra`` (round 1) have only ``best.json``: rank 0 reads
        it and broadcasts it, so the ranks still start from one value.

        Returns:
            The restored record, or None.
        """
        if "best" in extra:
            record = extra["best"]
        else:
            record = self._read_best_file() if strategy.rank == 0 else None
            record = strategy.broadcast_object(record)
        if record is not None and record.get("metric") != self.best_metric:
            record = None  # the recipe now picks the best by another metric: start that record afresh
        self._best = dict(record) if record is not None else None
        return self.best_record

    def save(
        self, strategy: Strategy, step: int, extra: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> Path:
        """Save a checkpoint for ``step`` (collective), record it as best if it is, prune old ones.

        Args:
            strategy: the set-up strategy.
            step: optimizer steps done.
            extra: this rank's loop state (``step`` and ``best`` are added).
            metrics: all-reduced validation metrics of this step, for the best-checkpoint choice.

        Returns:
            The checkpoint directory.
        """
        path = self.path_for(step)
        best = self._best
        if metrics is not None and self.best_metric is not None and self.is_best(metrics):
            best = {"step": int(step), "metric": self.best_metric, "value": float(metrics[self.best_metric])}
        strategy.save(path, {**dict(extra), "step": int(step), "best": best})
        self._best = best
        if strategy.rank == 0:
            if best is not None:
                write_json(self.root / BEST_FILE, best)
            self.prune()
        strategy.barrier()
        return path

    def prune(self) -> list[Path]:
        """Delete complete checkpoints beyond the last ``keep_last`` (never the best) and stale temporary dirs.

        Call on one rank only.
        """
        found = list_checkpoints(self.root)
        best = self.best_info()
        best_step = int(best["step"]) if best is not None else None
        keep = {s for s, _ in found[-self.keep_last :]}
        removed = []
        for step, path in found:
            if step not in keep and step != best_step:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def cleanup_partial(self) -> list[Path]:
        """Remove ``.tmp-``/``.old-`` directories left by a crash (call on rank 0 before the first save)."""
        removed = []
        if self.root.is_dir():
            for child in self.root.iterdir():
                if child.is_dir() and child.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
        return removed

    def _read_best_file(self) -> dict[str, Any] | None:
        try:
            with open(self.root / BEST_FILE) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not {"step", "metric", "value"} <= set(record):
            return None
        return dict(record)


# ---------------------------------------------------------------------------------------------- export
def _has_adapters(state_dict: Mapping[str, Any]) -> bool:
    from encdec.models.peft import is_adapter_key

    return any(is_adapter_key(k) for k in state_dict)


def export_consolidated(
    strategy: Strategy,
    out_path: str | Path,
    *,
    model_factory: Callable[[], torch.nn.Module] | None = None,
) -> Path | None:
    """Write one plain state dict (safetensors) on rank 0 from any strategy (collective).

    The full fp32 state dict is gathered first. When it holds PEFT adapters, it is loaded into an unsharded copy
    of the model made by ``model_factory`` and ``encdec.models.export.merge_and_export`` merges LoRA and re-fuses
    qkv, so the file loads into ``build_model`` without ``peft_config`` with ``strict=True``.

    Args:
        strategy: the set-up strategy.
        out_path: the ``.safetensors`` file to write.
        model_factory: builds the same (PEFT) model unsharded, e.g. ``lambda: build_model(task, **model_cfg)``;
            it may build on the meta device. Needed only when the model has adapters.

    Returns:
        ``out_path`` on rank 0, None on other ranks.

    Raises:
        CheckpointError: the model has adapters and no ``model_factory`` was given.
    """
    from safetensors.torch import save_file

    state = strategy.full_state_dict()
    out_path = Path(out_path)
    if state is not None:
        if _has_adapters(state):
            if model_factory is None:
                raise CheckpointError(
                    "the model has PEFT adapters: export_consolidated needs model_factory (a function building the "
                    "same model unsharded) to merge them; pass model_factory=lambda: build_model(task, **model_cfg)"
                )
            from encdec.models.export import merge_and_export
            from encdec.models.peft import reset_adapters

            plain = model_factory()
            if any(p.is_meta for p in plain.parameters()):
                plain = plain.to_empty(device="cpu")
                # to_empty leaves garbage in what the state dict does not carry (OFT's index buffers, which the
                # merge reads); the strict load below then overwrites every adapter weight
                reset_adapters(plain)
            plain.load_state_dict(state, strict=True)
            state = merge_and_export(plain)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".part")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        os.replace(tmp, out_path)
    strategy.barrier()
    return out_path if strategy.rank == 0 else None
