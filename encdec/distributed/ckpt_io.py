"""Checkpoint directory mechanics below both the strategies and the loop: atomic directories, ``meta.json``,
completeness and each rank's ``extra``.

Layout of one checkpoint (the strategies write ``state/``; this module the rest)::

    step_00000010/          a complete checkpoint (renamed into place only when every rank has written)
        meta.json           written last by rank 0: format, strategy, world size, step, adapter_only
        state/              the sharded state: a DCP directory (none/ddp/fsdp) or DeepSpeed's tag directory
        extra/rank_00000.pt each rank's ``extra`` (step, scheduler, RNG states, data position, best so far)
    .tmp-step_00000020/     being written; never counted as complete

``encdec.train.checkpoint`` (naming, keep-last + best, export) builds on this module and re-exports its names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "META_FILE",
    "OLD_PREFIX",
    "TMP_PREFIX",
    "CheckpointError",
    "atomic_checkpoint_dir",
    "is_complete",
    "load_extra",
    "read_meta",
    "read_meta_of_format",
    "save_extra",
    "write_json",
]

META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


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
    leaves either the previous checkpoint or a ``.tmp-`` directory, which is never counted as complete.
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
        write_json(tmp / META_FILE, {**dict(meta), "complete": True, "time": time.time()})
        old = final.parent / f"{OLD_PREFIX}{final.name}"
        if final.exists():  # re-saving a step (e.g. after resuming): keep the old one until the new one is in place
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as JSON through a ``.part`` file and a rename: readers see the old or the new file whole."""
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


def read_meta_of_format(ckpt_dir: str | Path, fmt: str, *, reader: str, readers: str) -> dict[str, Any]:
    """``read_meta``, checking that the checkpoint's state is in format ``fmt`` (what strategy ``reader`` loads).

    Args:
        ckpt_dir: the checkpoint.
        fmt: the state format the caller reads (``dcp``, ``deepspeed``).
        reader: the strategy about to load it.
        readers: who can read ``fmt``, for the message (e.g. ``none/ddp/fsdp``).

    Raises:
        CheckpointError: missing, incomplete, or written in another format (naming the strategy that wrote it).
    """
    meta = read_meta(ckpt_dir)
    if meta.get("format") != fmt:
        raise CheckpointError(
            f"checkpoint {str(ckpt_dir)!r} was written by strategy {meta.get('strategy')!r} in format "
            f"{meta.get('format')!r}; strategy {reader!r} reads {fmt!r} checkpoints ({readers}). "
            "Resume with the strategy that wrote it"
        )
    return meta


def is_complete(ckpt_dir: str | Path) -> bool:
    """True for a checkpoint directory that was renamed into place with a complete ``meta.json``."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.name.startswith((TMP_PREFIX, OLD_PREFIX)):
        return False
    try:
        with open(ckpt_dir / META_FILE) as f:
            return bool(json.load(f).get("complete", False))
    except (OSError, ValueError):
        return False


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
