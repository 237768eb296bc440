"""Spreading (scene, strip) tasks over Ray actors, each holding the model once and streaming its strips.

Each task is independent and writes its own part files; the driver assembles a scene when its last strip is
done. An actor that dies is restarted by Ray and its unfinished strip retried (``max_restarts``/
``max_task_retries``); strips already written are never redone.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from encdec.predict.outputs import strip_done
from encdec.predict.runner import StripRunner

if TYPE_CHECKING:
    from encdec.predict.api import PredictResult, ScenePlan

__all__ = ["run_on_ray"]


class _PredictActor:
    """A Ray actor: one model, strips on demand."""

    def __init__(self, runner: StripRunner, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.runner = runner

    def run(self, scene: Any, strip: int) -> int:
        return self.runner.run(scene, [strip]).windows


def run_on_ray(runner: StripRunner, todo: list[ScenePlan], *, workers: int, cpus_per_worker: float,
               result: PredictResult, on_scene_done: Callable[[ScenePlan], None],
               on_windows: Callable[[int], None]) -> None:
    """Run every pending strip of ``todo`` on ``workers`` actors; assemble scenes as they complete."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, configure_logging=True, log_to_driver=False)
    actor_cls = ray.remote(num_cpus=cpus_per_worker, max_restarts=2, max_task_retries=2)(_PredictActor)
    actors: list[Any] = [actor_cls.remote(runner, max(1, int(cpus_per_worker))) for _ in range(workers)]  # type: ignore[attr-defined]
    tasks: deque[tuple[int, int]] = deque()
    remaining: dict[int, int] = {}
    for i, sp in enumerate(todo):
        pending = [s.index for s in sp.plan.strips if not strip_done(runner.out_dir, sp.scene, s)]
        tasks.extend((i, s) for s in pending)
        remaining[i] = len(pending)
    idle: deque[Any] = deque(actors)
    inflight: dict[Any, tuple[Any, int, int]] = {}
    try:
        for i, n in list(remaining.items()):
            if n == 0:
                on_scene_done(todo[i])
        while tasks or inflight:
            while tasks and idle:
                i, s = tasks.popleft()
                if todo[i].scene.path in result.failed:
                    continue
                actor = idle.popleft()
                inflight[actor.run.remote(todo[i].scene, s)] = (actor, i, s)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor, i, s = inflight.pop(ready[0])
            idle.append(actor)
            path = todo[i].scene.path
            try:
                n = ray.get(ready[0])
            except Exception as e:
                result.failed.setdefault(path, f"{type(e).__name__}: {e}")
                continue
            result.windows += n
            on_windows(n)
            remaining[i] -= 1
            if remaining[i] == 0 and path not in result.failed:
                on_scene_done(todo[i])
    finally:
        for a in actors:
            ray.kill(a)
