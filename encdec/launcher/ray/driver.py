"""The Ray Train driver: ScalingConfig / RunConfig / FailureConfig from the recipe, ``TorchTrainer.fit``, progress.

``fit`` runs in a background thread so the main thread stays free for the progress bar and for signals:
the first Ctrl-C (or SIGTERM/SIGUSR1 from Slurm) asks the workers to checkpoint and return - the request goes
through a small actor that the workers poll and the engine all-reduces, so every rank stops at the same step;
a second Ctrl-C aborts without a checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encdec.launcher.recipe.errors import LaunchError

log = logging.getLogger(__name__)


def _drain(sink: Any, seen: int) -> list[dict[str, Any]]:
    import ray

    return list(ray.get(sink.drain.remote(seen), timeout=10))


class WarnOnce:
    """Best-effort calls: the first failure is reported, later ones stay quiet (the driver polls every 0.5 s; a
    sink that stops answering would otherwise be silent forever, or fill the log)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def call(self, fn: Callable[[], Any], default: Any) -> Any:
        try:
            return fn()
        except Exception as err:
            self.failures += 1
            if self.failures == 1:
                log.warning("%s failed (%s: %s); the run goes on, progress and metrics may lag behind it "
                            "(further failures are not reported)", self.what, type(err).__name__, err)
            return default

if TYPE_CHECKING:
    from encdec.launcher.recipe.schema import Recipe

__all__ = ["FitOutcome", "ProgressSink", "WarnOnce", "check_capacity", "fit", "scaling_spec", "worker_env"]


def scaling_spec(recipe: Recipe) -> dict[str, Any]:
    """What ``ScalingConfig`` will be asked for (pure: also printed by ``--dry-run``)."""
    c = recipe.cluster
    use_gpu = bool(c.gpus_per_worker)
    resources: dict[str, float] = {"CPU": float(c.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(c.gpus_per_worker or 0)
    # One worker per node: STRICT_SPREAD guarantees it. Several per node: SPREAD balances the bundles and the
    # per-node resources (GPUs) cap how many land on each node.
    if c.nodes == 1:
        placement = "PACK"
    elif c.workers_per_node == 1:
        placement = "STRICT_SPREAD"
    else:
        placement = "SPREAD"
    return {
        "num_workers": c.world_size,
        "use_gpu": use_gpu,
        "resources_per_worker": resources,
        "placement_strategy": placement,
    }


MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"


def worker_env(recipe: Recipe, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables the training workers start with (``RunConfig.worker_runtime_env``).

    CPU workers get ``MALLOC_MMAP_THRESHOLD_`` (``cluster.malloc_mmap_threshold``). glibc reads it once, when a
    process starts, so it must be in the worker's environment at exec: Ray's runtime_env ``env_vars`` are. Without
    it glibc raises its mmap threshold after large frees, and what a worker frees (the full fp32 build before
    sharding, the parameters FSDP2 / ZeRO-3 gather and free at every step) stays in its heap: FSDP2's full
    fine-tune peaked at 0.73x DDP's memory instead of 0.56x. A value the user gave wins: ``cluster.runtime_env.env_vars``
    (Ray merges it in; nothing is added here) or the launching shell's (passed on, also to remote clusters).
    GPU workers get nothing: their large tensors live in device memory.
    """
    environ = os.environ if environ is None else environ
    c = recipe.cluster
    if c.gpus_per_worker or MALLOC_ENV in ((c.runtime_env or {}).get("env_vars") or {}):
        return {}
    if MALLOC_ENV in environ:
        return {MALLOC_ENV: environ[MALLOC_ENV]}
    return {} if c.malloc_mmap_threshold is None else {MALLOC_ENV: str(c.malloc_mmap_threshold)}


def run_spec(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """What ``RunConfig`` will be (storage, name, failures, retention, worker env) for the dry-run printout."""
    env = worker_env(recipe)
    return {
        "name": run_dir.name,
        "storage_path": str(run_dir.parent),
        "max_failures": recipe.train.max_failures,
        "checkpoints": f"engine keeps the last {recipe.train.keep_last} + the best (reported to Ray without copying)",
        "worker_env": " ".join(f"{k}={v}" for k, v in env.items()) or "-",
    }


# ------------------------------------------------------------------------------------------------ capacity
def check_capacity(recipe: Recipe) -> dict[str, Any]:
    """Compare the recipe's nodes/resources with the connected cluster; LaunchError before anything starts."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    c = recipe.cluster
    total_cpu = sum(n.get("Resources", {}).get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("Resources", {}).get("GPU", 0.0) for n in nodes)
    if c.gpus_per_worker is None:  # auto: a GPU per worker when the cluster has them
        c.gpus_per_worker = 1.0 if total_gpu >= c.world_size else 0.0
    need_cpu = c.world_size * c.cpus_per_worker
    need_gpu = c.world_size * c.gpus_per_worker
    hint = ("see what it would need with --dry-run, join a bigger cluster with --address, submit with --slurm, "
            "or try the multi-node path on this machine with --simulate-nodes N")
    if c.nodes > len(nodes):
        raise LaunchError(f"the recipe asks for {c.nodes} nodes (cluster.nodes / --nodes) but the Ray cluster has "
                          f"{len(nodes)}; {hint}")
    if need_cpu > total_cpu + 1e-9:
        raise LaunchError(f"{c.world_size} workers x {c.cpus_per_worker:g} CPUs = {need_cpu:g} CPUs but the cluster "
                          f"has {total_cpu:g}; lower cluster.cpus_per_worker (e.g. --set cluster.cpus_per_worker=0.5) "
                          f"or {hint}")
    if need_gpu > total_gpu + 1e-9:
        raise LaunchError(f"{c.world_size} workers x {c.gpus_per_worker:g} GPUs = {need_gpu:g} GPUs but the cluster "
                          f"has {total_gpu:g}; set cluster.gpus_per_worker=0 to train on CPU, or {hint}")
    per_node_gpu = max((n.get("Resources", {}).get("GPU", 0.0) for n in nodes), default=0.0)
    if c.gpus_per_worker and c.workers_per_node * c.gpus_per_worker > per_node_gpu + 1e-9:
        raise LaunchError(f"{c.workers_per_node} workers per node x {c.gpus_per_worker:g} GPUs do not fit a node "
                          f"with {per_node_gpu:g} GPUs; lower cluster.workers_per_node")
    return {"nodes": len(nodes), "cpus": total_cpu, "gpus": total_gpu, "gpus_per_worker": c.gpus_per_worker}


def check_shared_storage(run_dir: Path, nodes: int) -> None:
    """With several nodes, every node must see the run directory: a task on each node looks for a marker file."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if nodes <= 1:
        return
    marker = run_dir / ".storage-check"
    marker.write_text(str(time.time()))

    @ray.remote(num_cpus=0)
    def sees(path: str) -> tuple[str, bool]:
        import socket

        return socket.gethostname(), Path(path).is_file()

    alive = [n for n in ray.nodes() if n.get("Alive")]
    refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in alive]
    missing = [f"{host} ({n['NodeManagerAddress']})" for (host, ok), n in zip(ray.get(refs, timeout=120), alive) if not ok]
    marker.unlink(missing_ok=True)
    if missing:
        raise LaunchError(f"the run directory {run_dir} is not visible from node(s) {', '.join(missing)}; "
                          "cluster.storage must be a filesystem shared by every node (NFS, Lustre, a mounted "
                          "bucket): set --storage /shared/path")


# ------------------------------------------------------------------------------------------------ progress actor
class ProgressSink:
    """Actor between the workers and the driver: metrics in, stop requests out (no CPU reserved)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.stop = False
        self.final: dict[int, dict[str, Any]] = {}

    def push(self, metrics: dict[str, Any]) -> None:
        self.items.append(metrics)

    def drain(self, since: int) -> list[dict[str, Any]]:
        return self.items[since:]

    def request_stop(self) -> None:
        self.stop = True

    def should_stop(self) -> bool:
        return self.stop

    def finished(self, rank: int, final: dict[str, Any]) -> None:
        self.final[rank] = final

    def finals(self) -> dict[int, dict[str, Any]]:
        return self.final


@dataclass
class FitOutcome:
    """How ``fit`` ended."""

    metrics: list[dict[str, Any]] = field(default_factory=list)
    finals: dict[int, dict[str, Any]] = field(default_factory=dict)
    stopped: bool = False
    error: BaseException | None = None
    seconds: float = 0.0


def train_config(recipe: Recipe, run_dir: Path, sink: Any) -> dict[str, Any]:
    """``train_loop_config``: the recipe's typed sections (each worker gets its own copy; never the whole recipe),
    run dir, sink."""
    return {
        "task": recipe.task,
        "model": recipe.model,
        "loss": recipe.loss,
        "data": recipe.data,
        "optim": recipe.optim,
        "train": recipe.train,
        "seed": recipe.run.seed,
        "init_from": recipe.run.init_from,
        "run_dir": str(run_dir),
        "sink": sink,
    }


def fit(
    recipe: Recipe,
    run_dir: Path,
    *,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    on_stop_requested: Callable[[], None] | None = None,
) -> FitOutcome:
    """Run the recipe on the connected Ray cluster with ``TorchTrainer`` and stream rank 0's metrics.

    Args:
        recipe: the validated recipe.
        run_dir: this run's directory: Ray's ``storage_path/name``, where the engine writes checkpoints.
        on_metrics: called in the main thread with each report of rank 0 (the progress bar).
        on_stop_requested: called when the first Ctrl-C/SIGTERM/SIGUSR1 arrives.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from encdec.launcher.failures import StopOnDataError
    from encdec.launcher.ray.worker import train_loop_per_worker

    spec = scaling_spec(recipe)
    sink: Any = ray.remote(num_cpus=0)(ProgressSink).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_config(recipe, run_dir, sink),
        scaling_config=ScalingConfig(**spec),
        torch_config=TorchConfig(backend="nccl" if spec["use_gpu"] else "gloo", timeout_s=recipe.train.pg_timeout_s),
        # Train V2's RunConfig at runtime (worker_runtime_env); type checkers resolve ray.air's V1 class
        run_config=RunConfig(  # type: ignore[call-arg]
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=recipe.train.max_failures),
            callbacks=[StopOnDataError()],  # type: ignore[list-item]  # V2 UserCallback; no retry of data errors
            # the engine prunes its own checkpoints (keep_last + best); Ray must not delete them under it
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": env} if (env := worker_env(recipe)) else None,
        ),
    )
    outcome = FitOutcome()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # surfaced to the main thread below
            box["error"] = err

    interrupts = {"n": 0}

    def handler(signum: int, _frame: Any) -> None:
        interrupts["n"] += 1
        if interrupts["n"] == 1:
            outcome.stopped = True
            sink.request_stop.remote()
            if on_stop_requested is not None:
                on_stop_requested()
        else:
            raise KeyboardInterrupt

    # issue 16 hook: a Ray Tune trial calls fit from a thread, where Python allows no signal handlers (Tune stops it)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)} if main else {}
    for s in previous:
        signal.signal(s, handler)
    start = time.perf_counter()
    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    seen = 0
    sink_calls = WarnOnce("reading the progress sink")
    try:
        while True:
            thread.join(timeout=0.5)
            # the sink is best effort: a slow answer must not stop the run
            new = sink_calls.call(functools.partial(_drain, sink, seen), [])
            seen += len(new)
            outcome.metrics += new
            for m in new:
                if on_metrics is not None:
                    on_metrics(m)
            if not thread.is_alive():
                break
        outcome.finals = sink_calls.call(lambda: ray.get(sink.finals.remote(), timeout=10), {})
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        outcome.seconds = time.perf_counter() - start
    if "error" in box:
        outcome.error = box["error"]
    ray.kill(sink)
    return outcome
