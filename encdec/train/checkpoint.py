"""Checkpoint bookkeeping shared by every strategy: atomic directories, completeness, last-k + best, export.

Layout of one run's checkpoints (``root`` is ``<run_dir>/checkpoints``)::

    root/step_00000010/          a complete checkpoint (renamed into place only when every rank has written)
        meta.json                written last by rank 0: format, strategy, world size, step, adapter_only
        state/                   the sharded state: a DCP directory (none/ddp/fsdp) or DeepSpeed's tag directory
        extra/rank_00000.pt      each rank's ``extra`` (step, scheduler, RNG states, data position)
    root/.tmp-step_00000020/     being written; never picked up by ``find_latest_checkpoint``
    root/best.json               which step holds the best validation metric so far

The strategies (``encdec.distributed``) write ``state/`` and ``extra/``; this module owns the rest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from encdec.distributed.strategy import Strategy

__all__ = [
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

META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match what is being loaded into it."""


# ---------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_checkpoint_dir(
    final: str | Path,
    *,
    rank: int,
    barrier: Callable[[], None],
    meta: Mapping[str, Any],
) -> Iterator[Path]:
    """Collective context that yields a temporary directory and renames it to ``final`` once all ranks are done.

    Every rank enters it; rank 0 prepares ``<parent>/.tmp-<name>``, each rank writes its files there, then rank 0
    writes ``meta.json`` (the completeness marker) and renames the directory into place. A crash at any point
    leaves either the previous checkpoint or a ``.tmp-`` directory, which ``find_latest_checkpoint`` ignores.
    The directory must be on storage every rank sees (a shared file system when ranks span nodes).

    Args:
        final: the checkpoint directory to produce.
        rank: this process's rank.
        barrier: waits for all ranks (a no-op in one process).
        meta: JSON-serialisable description written to ``meta.json`` (``complete`` and ``time`` are added).
    """
    final = Path(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over from a crash during an earlier save of the same step
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    yield tmp
    barrier()  # every rank has finished writing its shard
    if rank == 0:
        _write_json(tmp / META_FILE, {**dict(meta), "complete": True, "time": time.time()})
        old = final.parent / f"{_OLD_PREFIX}{final.name}"
        if final.exists():  # re-saving a step (e.g. after resuming): keep the old one until the new one is in place
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- reading
def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a complete checkpoint.

    Raises:
        CheckpointError: the directory is missing or was never completed.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {str(ckpt_dir)!r} does not exist")
    if not is_complete(ckpt_dir):
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} is incomplete (no {META_FILE} marked complete; it was being written when "
            "the run stopped); resume from an earlier one, e.g. find_latest_checkpoint(<run_dir>/checkpoints)"
        )
    with open(ckpt_dir / META_FILE) as f:
        return dict(json.load(f))


def is_complete(ckpt_dir: str | Path) -> bool:
    """True for a checkpoint directory that was renamed into place with a complete ``meta.json``."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.name.startswith((TMP_PREFIX, _OLD_PREFIX)):
        return False
    try:
        with open(ckpt_dir / META_FILE) as f:
            return bool(json.load(f).get("complete", False))
    except (OSError, ValueError):
        return False


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


# ---------------------------------------------------------------------------------------------- per-rank extra
def save_extra(tmp_dir: Path, rank: int, extra: Mapping[str, Any]) -> None:
    """Write this rank's ``extra`` into a checkpoint being written."""
    (tmp_dir / "extra").mkdir(parents=True, exist_ok=True)
    torch.save(dict(extra), tmp_dir / "extra" / f"rank_{rank:05d}.pt")


def load_extra(ckpt_dir: str | Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's ``extra`` when the world size is unchanged, rank 0's otherwise."""
    ckpt_dir = Path(ckpt_dir)
    saved_ws = int(read_meta(ckpt_dir).get("world_size", 1))
    src = rank if saved_ws == world_size else 0
    path = ckpt_dir / "extra" / f"rank_{src:05d}.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} has no {path.name} in extra/; it is damaged")
    # a run directory can be shared: read it without running anything from it (RNG states hold numpy arrays)
    from encdec.models.safe_load import safe_torch_load
    return dict(safe_torch_load(path, stub_unknown=False, mmap=False))


# ---------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Names, saves and prunes a run's checkpoints: the last ``keep_last`` plus the best by a validation metric.

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

    def path_for(self, step: int) -> Path:
        """The directory of the checkpoint at optimizer step ``step``."""
        return self.root / f"step_{int(step):08d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint."""
        return find_latest_checkpoint(self.root)

    def best(self) -> Path | None:
        """The complete checkpoint with the best ``best_metric`` so far."""
        info = self._read_best()
        if info is None:
            return None
        path = self.path_for(int(info["step"]))
        return path if is_complete(path) else None

    def best_info(self) -> dict[str, Any] | None:
        """``{"step", "metric", "value"}`` of the best checkpoint, or None."""
        return self._read_best()

    def save(
        self, strategy: Strategy, step: int, extra: Mapping[str, Any], metrics: Mapping[str, float] | None = None
    ) -> Path:
        """Save a checkpoint for ``step`` (collective), record it as best if it is, prune old ones.

        Args:
            strategy: the set-up strategy.
            step: optimizer steps done.
            extra: this rank's loop state (``step`` is added).
            metrics: validation metrics of this step, for the best-checkpoint choice.

        Returns:
            The checkpoint directory.
        """
        path = self.path_for(step)
        strategy.save(path, {**dict(extra), "step": int(step)})
        if strategy.rank == 0:
            self._update_best(step, metrics)
            self.prune()
        strategy.barrier()
        return path

    def prune(self) -> list[Path]:
        """Delete complete checkpoints beyond the last ``keep_last`` (never the best) and stale temporary dirs.

        Call on one rank only.
        """
        found = list_checkpoints(self.root)
        best = self._read_best()
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
                if child.is_dir() and child.name.startswith((TMP_PREFIX, _OLD_PREFIX)):
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
        return removed

    def _read_best(self) -> dict[str, Any] | None:
        try:
            with open(self.root / "best.json") as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return None

    def _update_best(self, step: int, metrics: Mapping[str, float] | None) -> None:
        if self.best_metric is None or not metrics or self.best_metric not in metrics:
            return
        value = float(metrics[self.best_metric])
        if math.isnan(value):
            return
        current = self._read_best()
        if current is not None and is_complete(self.path_for(int(current["step"]))):
            better = value > current["value"] if self.best_mode == "max" else value < current["value"]
            if not better:
                return
        _write_json(self.root / "best.json", {"step": int(step), "metric": self.best_metric, "value": value})


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
