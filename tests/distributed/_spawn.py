"""Run a function in N real processes joined by a gloo process group (CPU), and collect what each returns.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh interpreters (multiprocessing "spawn":
no forked OpenMP/gloo state), sets the ``env://`` variables with a free ``MASTER_PORT`` (so parallel test runs do
not clash), initialises the process group through ``encdec.distributed.init_process_group`` (the code path the
trainer uses) and calls ``fn(rank, world_size, *args)``. ``fn`` must be importable (module level) and its
arguments and results picklable. A failure in any rank is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["DistributedRunError", "run_distributed"]


class DistributedRunError(RuntimeError):
    """A rank raised, died or timed out."""


def _worker(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], env: dict[str, str], q: Any
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    try:
        import torch

        # N processes share few cores: one intra-op thread each avoids oversubscription (and keeps runs fast)
        torch.set_num_threads(int(env.get("ENCDEC_TEST_THREADS", "1")))
        import torch.distributed as dist

        from encdec.distributed import init_process_group

        init_process_group("gloo", timeout_s=float(env.get("ENCDEC_TEST_PG_TIMEOUT", "120")))
        try:
            result = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        # bytes, not tensors: torch's queue reducers share tensors by file descriptor, which dies with this process
        buf = io.BytesIO()
        torch.save(result, buf)
        q.put((rank, True, buf.getvalue()))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the results ordered by rank.

    Raises:
        DistributedRunError: a rank raised (its traceback is in the message), exited without a result, or the
            run exceeded ``timeout_s``.
    """
    from encdec.distributed import find_free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, dict(env or {}), q), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        import time

        deadline = time.monotonic() + timeout_s
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedRunError(f"distributed run of {fn.__name__} timed out after {timeout_s:.0f} s")
            try:
                rank, ok, payload = q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and q.empty():
                    # a rank died without reporting (segfault, OOM kill); the others would wait forever
                    time.sleep(0.5)
                    if q.empty():
                        codes = {i: p.exitcode for i, p in enumerate(procs)}
                        raise DistributedRunError(
                            f"{fn.__name__}: a rank exited without a result, exit codes {codes}"
                        ) from None
                continue
            if ok:
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # the other ranks are likely blocked in a collective
        if errors:
            raise DistributedRunError(f"{fn.__name__} failed:\n" + "\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world_size)]
