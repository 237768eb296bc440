"""Process-group set-up: idempotent (Ray Train and torchrun may already have made one), gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import datetime
import os
import socket

import torch

__all__ = ["default_backend", "default_device", "find_free_port", "init_process_group", "local_rank"]


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_backend() -> str:
    """``nccl`` when CUDA is usable, ``gloo`` otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is usable, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def find_free_port() -> int:
    """A TCP port the OS reports free now (for ``MASTER_PORT`` in tests and local launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(backend: str | None = None, *, timeout_s: float = 1800.0) -> bool:
    """Join the default process group if the environment describes one; do nothing if one exists.

    Reads the usual ``env://`` variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), which Ray
    Train, torchrun and Slurm wrappers set. Without ``WORLD_SIZE`` (a plain single process) no group is made.

    Args:
        backend: ``gloo`` or ``nccl``; default: NCCL with CUDA, else gloo.
        timeout_s: collective timeout.

    Returns:
        True when a process group is initialised after the call.

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 is set but ``MASTER_ADDR``/``MASTER_PORT``/``RANK`` are missing.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", "0") or 0)
    if world_size < 1:
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not; set all of MASTER_ADDR, MASTER_PORT, "
            "RANK and WORLD_SIZE (torchrun and Ray Train do) or unset WORLD_SIZE for a single process"
        )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True
