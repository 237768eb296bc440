"""Spreading predict tasks over Ray actors, each holding the model once: (scene, strip) tasks for maps, whole
scenes for scalar tasks.

Each task is independent and writes its own part files; the driver assembles a scene when its last task is done.
An actor that dies is restarted by Ray and its unfinished task retried (``max_restarts``/``max_task_retries``);
parts already written are never redone.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from encdec.predict.outputs import strip_done
from encdec.predict.runner import ModelWorker, StripRunner

if TYPE_CHECKING:
    from encdec.predict.api import PredictResult, ScenePlan
    from encdec.predict.scalar import ScalarRunner
    from encdec.predict.scenes import SceneInfo

__all__ = ["run_on_ray", "run_scalar_on_ray"]


class _Worker:
    """A Ray actor: one runner (the model, built on its first task), tasks on demand: ``runner.run(*args)``."""

    def __init__(self, runner: ModelWorker, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.runner = runner

    def run(self, *args: Any) -> Any:
        return self.runner.run(*args)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _actors(runner: ModelWorker, workers: int, cpus: float, gpus: float | None) -> Iterator[list[Any]]:
    """``workers`` actors holding ``runner``, each with ``cpus`` CPUs (its torch threads) and ``gpus`` GPUs
    (``None``: one each when the model is to run on CUDA and the cluster has GPUs; Ray hides the GPUs from an
    actor that asked for none, which would then predict on its CPU). Killed on exit.

    The runner (the model) is put in the object store once and its ref held until exit: a restarted actor re-reads
    its constructor argument from there (Ray issue 53727: restarts fail once it is gone).
    """
    import ray

    from encdec.predict.errors import PredictError

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, configure_logging=True, log_to_driver=False)
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus is None:
        gpus = 1.0 if have >= 1 and (runner.device is None or str(runner.device).startswith("cuda")) else 0.0
    if gpus * workers > have:
        raise PredictError(f"{workers} workers x gpus_per_worker={gpus:g} need {gpus * workers:g} GPUs; the Ray "
                           f"cluster has {have:g}. Fix: fewer workers (--workers), or --gpus-per-worker 0 to "
                           f"predict on CPUs.")
    actor_cls: Any = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=2, max_task_retries=2)(_Worker)
    runner_ref = ray.put(runner)
    actors = [actor_cls.remote(runner_ref, max(1, int(cpus))) for _ in range(workers)]
    try:
        yield actors
    finally:
        for a in actors:
            ray.kill(a)
        del runner_ref


def _run_tasks(actors: list[Any], tasks: deque[tuple[int, tuple[Any, ...]]], *,
               on_result: Callable[[int, Any], None], on_error: Callable[[int, Exception], None],
               skip: Callable[[int], bool] = lambda key: False) -> None:
    """Give each idle actor the next task (``actor.run(*args)``) until all are done; ``on_result(key, value)`` or
    ``on_error(key, error)`` as each finishes, in the driver. Tasks whose key ``skip`` names are dropped."""
    import ray

    idle: deque[Any] = deque(actors)
    inflight: dict[Any, tuple[Any, int]] = {}
    while tasks or inflight:
        while tasks and idle:
            key, args = tasks.popleft()
            if skip(key):
                continue
            actor = idle.popleft()
            inflight[actor.run.remote(*args)] = (actor, key)
        if not inflight:
            break
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor, key = inflight.pop(ready[0])
        idle.append(actor)
        try:
            value = ray.get(ready[0])
        except Exception as e:
            on_error(key, e)
            continue
        on_result(key, value)


def run_on_ray(runner: StripRunner, todo: list[ScenePlan], *, workers: int, cpus_per_worker: float,
               gpus_per_worker: float | None, result: PredictResult, on_scene_done: Callable[[ScenePlan], None],
               on_windows: Callable[[int], None]) -> None:
    """Run every pending strip of ``todo`` on ``workers`` actors; assemble scenes as they complete.

    Assembly (``on_scene_done``) runs on one driver thread beside the dispatch loop, so actors get their next strip
    while a finished scene is written; a scene whose assembly fails is listed in ``result.failed``.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    tasks: deque[tuple[int, tuple[Any, ...]]] = deque()
    remaining: dict[int, int] = {}
    for i, sp in enumerate(todo):
        pending = [s.index for s in sp.plan.strips if not strip_done(runner.out_dir, sp.scene, s)]
        tasks.extend((i, (sp.scene, [s])) for s in pending)
        remaining[i] = len(pending)
    assembling: dict[str, Future[None]] = {}

    def failed(i: int, e: Exception) -> None:
        result.failed.setdefault(todo[i].scene.path, f"{type(e).__name__}: {e}")

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-assemble") as pool:

        def assemble(i: int) -> None:
            assembling[todo[i].scene.path] = pool.submit(on_scene_done, todo[i])

        def strip_finished(i: int, stats: Any) -> None:
            result.windows += stats.windows
            on_windows(stats.windows)
            remaining[i] -= 1
            if remaining[i] == 0 and todo[i].scene.path not in result.failed:
                assemble(i)

        with _actors(runner, workers, cpus_per_worker, gpus_per_worker) as actors:
            for i, n in remaining.items():
                if n == 0:  # every strip written by an earlier, interrupted run
                    assemble(i)
            _run_tasks(actors, tasks, on_result=strip_finished, on_error=failed,
                       skip=lambda i: todo[i].scene.path in result.failed)
        for path, fut in assembling.items():
            err = fut.exception()
            if err is not None:
                result.failed.setdefault(path, f"{type(err).__name__}: {err}")


def run_scalar_on_ray(runner: ScalarRunner, scenes: list[SceneInfo], *, workers: int, cpus_per_worker: float,
                      gpus_per_worker: float | None, result: PredictResult, on_scene_done: Callable[[], None],
                      on_windows: Callable[[int], None]) -> None:
    """Run each scene of a scalar task on one of ``workers`` actors (a scene's windows are few: the scene is the
    unit of work); a scene that raises is listed in ``result.failed``, an actor that dies is restarted and its
    scene retried (a finished part is never redone)."""

    def done(i: int, n: int) -> None:
        result.windows += n
        on_windows(n)
        on_scene_done()

    def failed(i: int, e: Exception) -> None:  # a failed scene is listed (CLI exit 4); the others are written
        result.failed.setdefault(scenes[i].path, f"{type(e).__name__}: {e}")

    tasks: deque[tuple[int, tuple[Any, ...]]] = deque((i, (scene,)) for i, scene in enumerate(scenes))
    with _actors(runner, min(workers, len(scenes)), cpus_per_worker, gpus_per_worker) as actors:
        _run_tasks(actors, tasks, on_result=done, on_error=failed)
