"""Process-group set-up: idempotent (Ray Train and torchrun may already have made one), gloo on CPU, NCCL on GPU.

NCCL needs to know each rank's device: a group made here is bound to it (``device_id``), and every barrier names it
(``device_ids``). Without that NCCL guesses the device for a barrier ("using GPU 0 to perform barrier as devices used
by this process are currently unknown"), the pattern behind FSDP2 hangs under Ray Train (ray-project/ray#57860).
The collective timeout is the recipe's ``train.pg_timeout_s``.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch

__all__ = [
    "DEFAULT_PG_TIMEOUT_S",
    "barrier",
    "default_backend",
    "default_device",
    "ensure_process_group",
    "find_free_port",
    "init_process_group",
    "local_rank",
]

DEFAULT_PG_TIMEOUT_S = 1800.0
"""torch's own default for collectives (30 min); the recipe's ``train.pg_timeout_s`` overrides it."""


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


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free now (``MASTER_PORT`` in tests and local launches, local Ray's ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_process_group(backend: str | None = None, *, timeout_s: float = DEFAULT_PG_TIMEOUT_S) -> None:
    """Join the process group the environment describes, or make a group of one (rank 0 on a free local port)
    when it describes none: DeepSpeed and its checkpoint loading need a group even in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    init_process_group(backend, timeout_s=timeout_s)


def init_process_group(backend: str | None = None, *, timeout_s: float = DEFAULT_PG_TIMEOUT_S) -> bool:
    """Join the default process group if the environment describes one; do nothing if one exists.

    Reads the usual ``env://`` variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), which Ray
    Train, torchrun and Slurm wrappers set. Without ``WORLD_SIZE`` (a plain single process) no group is made.

    Args:
        backend: ``gloo`` or ``nccl``; default: NCCL with CUDA, else gloo.
        timeout_s: collective timeout (``train.pg_timeout_s``): how long a rank waits in a collective for the
            others before the job fails instead of hanging.

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
    timeout = datetime.timedelta(seconds=float(timeout_s))
    if backend == "nccl":
        device = default_device()
        torch.cuda.set_device(device)
        # bind the group to this rank's GPU: NCCL then never has to guess it (see the module docstring)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    return True


def barrier(device: torch.device | None = None) -> None:
    """Wait for every rank (no-op without a process group); on NCCL on ``device`` (default: this rank's GPU).

    NCCL's barrier is a collective on a device: without ``device_ids`` it guesses one from the rank, which is
    wrong where a worker sees another GPU than ``cuda:<rank>`` (Ray Train, ``CUDA_VISIBLE_DEVICES``), and a rank
    waiting on the wrong GPU hangs the job.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        if device is None or device.type != "cuda":
            device = default_device()
        index = device.index if device.index is not None else torch.cuda.current_device()
        dist.barrier(device_ids=[index])
    else:
        dist.barrier()
