"""Patches of DeepSpeed's private state, each gated by the DeepSpeed version it was written and tested against.

Three places reach past DeepSpeed's public API:

* ``share_stage3_fp32_master``: ZeRO-3's fp32 master partition aliases the parameter partition (a memory fix);
* ``release_grad_pages``: ``madvise`` of ZeRO-3's flat gradient partition between steps (a memory fix);
* ``universal_checkpoint_loading``: ``engine._config.load_universal_checkpoint`` flipped around one load (resume
  at another world size).

Private attributes change between DeepSpeed releases without notice, so each patch runs only inside
``TESTED_DEEPSPEED`` (the range ``pyproject.toml`` pins). Outside it the two memory fixes are skipped with a warning
(the run stays correct and uses more memory); the universal-checkpoint switch, without which a resize cannot
load, fails with a clear error instead of a traceback from inside DeepSpeed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from torch import Tensor

__all__ = [
    "TESTED_DEEPSPEED",
    "deepspeed_version",
    "patch_enabled",
    "release_grad_pages",
    "share_stage3_fp32_master",
    "universal_checkpoint_loading",
]

TESTED_DEEPSPEED = ((0, 19), (0, 20))
"""DeepSpeed versions (``>=`` first, ``<`` second, major.minor) whose private state the patches were tested on;
keep in step with ``deepspeed>=0.19,<0.20`` in pyproject.toml."""


class DeepSpeedPatchWarning(UserWarning):
    """A DeepSpeed private-state patch was skipped: this DeepSpeed is outside the tested range."""


def deepspeed_version() -> str | None:
    """The installed DeepSpeed version string (None when DeepSpeed is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        pass
    # A DeepSpeed copied or vendored without its dist-info has no package metadata; its module still knows its
    # version, and judging by that keeps the patches on instead of silently disabling them.
    try:
        import deepspeed
    except ImportError:
        return None
    version = getattr(deepspeed, "__version__", None)
    return str(version) if version else None


def _in_tested_range(version: str | None) -> bool:
    if not version:
        return False
    try:
        parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:  # e.g. a dev build "0.20.0a1" still parses; anything stranger counts as untested
        return False
    low, high = TESTED_DEEPSPEED
    return low <= parts < high


def _range_text() -> str:
    (a, b), (c, d) = TESTED_DEEPSPEED
    return f">={a}.{b},<{c}.{d}"


def patch_enabled(patch: str, consequence: str, version: str | None = None) -> bool:
    """Whether the private-state patch ``patch`` may run on this DeepSpeed; warns (once per patch) when not.

    Args:
        patch: the patch's name, for the message.
        consequence: what skipping it costs, for the message.
        version: the DeepSpeed version to judge (default: the installed one).
    """
    version = deepspeed_version() if version is None else version
    if _in_tested_range(version):
        return True
    _warn_once(patch, consequence, version)
    return False


@functools.cache
def _warn_once(patch: str, consequence: str, version: str | None) -> None:
    warnings.warn(
        f"DeepSpeed {version} is outside the range encdec-launch's DeepSpeed patches were tested with "
        f"({_range_text()}); skipping {patch}: {consequence}. Install deepspeed{_range_text()} to get it back",
        DeepSpeedPatchWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def universal_checkpoint_loading(engine: Any, enabled: bool) -> Iterator[None]:
    """Let ``engine.load_checkpoint`` read a universal checkpoint (``enabled``) for the duration of the context.

    DeepSpeed decides this from its config at ``initialize`` time, before the loop knows which checkpoint it will
    resume; the engine's private ``_config.load_universal_checkpoint`` is switched around the one load instead.

    Raises:
        CheckpointError: a universal load is needed on a DeepSpeed outside the tested range (or whose engine has
            no such setting); resume at the world size and ZeRO stage that wrote the checkpoint instead.
    """
    if not enabled:
        yield
        return
    from encdec.distributed.ckpt_io import CheckpointError

    version = deepspeed_version()
    config: Any = getattr(engine, "_config", None)
    if not _in_tested_range(version) or not hasattr(config, "load_universal_checkpoint"):
        raise CheckpointError(
            f"resuming a DeepSpeed checkpoint at another world size or ZeRO stage switches DeepSpeed's private "
            f"engine._config.load_universal_checkpoint, tested with deepspeed{_range_text()} only; this is "
            f"DeepSpeed {version}. Resume at the world size and zero_stage that wrote the checkpoint, or install "
            f"deepspeed{_range_text()}"
        )
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = previous


def share_stage3_fp32_master(zero_optimizer: Any) -> int:
    """Let ZeRO-3's fp32 master partition be this rank's parameter partition when both are fp32; returns bytes freed.

    DeepSpeed (0.19) means to skip the separate master copy when the partition is already in the master dtype
    (``_create_fp32_partitions``: "we don't need another copy of the weights"), but it tests
    ``tensor.device == self.device`` with ``self.device`` a string ('cpu', 'cuda:0'), which a ``torch.device``
    never equals: every fp32 run kept a second copy of its partition (1/world of the model, 0.6 GiB per worker for
    the 300M at 2 workers). Every later write between the two is an in-place ``copy_`` (after each sub-group's
    step, checkpoint loads), which is a no-op on shared storage, so aliasing them is what DeepSpeed's own branch
    does. Skipped with offloading/NVMe swapping, for bf16/fp16 partitions, and once optimizer state exists.
    """
    if not patch_enabled("share_stage3_fp32_master", "fp32 ZeRO-3 runs keep a second fp32 copy of each partition"):
        return 0
    masters = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    partitions = getattr(zero_optimizer, "fp16_partitioned_groups_flat", None)
    if not masters or not partitions or len(masters) != len(partitions):
        return 0
    if getattr(zero_optimizer, "offload_optimizer", False) or getattr(zero_optimizer, "swap_optimizer", False):
        return 0
    inner = getattr(zero_optimizer, "optimizer", None)
    state = getattr(inner, "state", {})
    freed = 0
    for master, part in zip(masters, partitions):
        if part is None or master.data_ptr() == part.data_ptr() or state.get(master):
            continue
        if master.dtype != part.dtype or master.device != part.device or master.shape != part.shape:
            continue
        master.data = part.data  # same Python object: the optimizer and DeepSpeed's lists keep their references
        freed += part.numel() * part.element_size()
    return freed


def release_grad_pages(zero_optimizer: Any) -> int:
    """Zero ZeRO-3's flat gradient partition and hand its pages back to the OS (CPU, Linux); returns bytes released.

    ZeRO-3 keeps one flat fp32 buffer for this rank's gradient partition (``grad_partitions_flat_buffer``, 1/world
    of the model) allocated for the whole run, while FSDP2 and DDP free gradients after the step. Between the
    optimizer step and the next backward its contents are dead (the next backward overwrites every gradient it
    produces), so ``madvise(MADV_DONTNEED)`` drops its pages: they read as zeros and come back on first write,
    during backward, when the activations that peak at the end of forward are being freed. The partial pages at
    both ends are zeroed so the whole buffer reads zero (a parameter without a gradient gets a zero one, as after
    ``zero_grad``). No-op for device memory or when the buffer is missing.
    """
    if not patch_enabled("release_grad_pages", "the gradient partition stays resident between steps"):
        return 0
    buf = getattr(zero_optimizer, "grad_partitions_flat_buffer", None)
    if not isinstance(buf, Tensor) or buf.device.type != "cpu" or not sys.platform.startswith("linux"):
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = buf.data_ptr()
    nbytes = buf.numel() * buf.element_size()
    lo = -(-start // page) * page
    hi = (start + nbytes) // page * page
    if hi - lo < 16 * page or (lo - start) % buf.element_size() or (hi - start) % buf.element_size():
        buf.zero_()
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontneed = 4
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), madv_dontneed) != 0:
        buf.zero_()  # the kernel refused: keep the pages, same contents
        return 0
    flat = buf.view(-1)
    flat[: (lo - start) // buf.element_size()].zero_()
    flat[(hi - start) // buf.element_size():].zero_()
    return hi - lo
