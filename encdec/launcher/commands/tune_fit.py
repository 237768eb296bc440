"""How many trials of a search run at once: a trial's footprint from the planner, packed onto the cluster's nodes.

A trial is a Tune actor (its driver, ``tune.trial_cpus`` CPUs) that starts a TorchTrainer: ``cluster.nodes``
groups of ``cluster.workers_per_node`` workers, each group on its own node, each worker holding
``cluster.cpus_per_worker`` CPUs, ``cluster.gpus_per_worker`` GPUs and - on CPU workers - the memory the planner
(``encdec.launcher.preflight.plan.make_plan``) estimates for one worker of the recipe's strategy. GPU workers keep
their model in device memory, which the plan checks per GPU; their host memory is not counted here.

Tune starts a trial's driver before the driver asks for its workers, so trials that start together while the
cluster has room for their drivers but not for all their workers wait on each other for ever (on a 2-CPU machine:
four 0.5-CPU drivers hold every CPU). The search therefore runs at most as many trials at once as fit whole, and
stops before any trial starts when not even one fits.

The footprint is the largest over the search space: every value of a key that can change it (``cluster.*``,
``data.*``, ``model.*``, the strategy, precision, optimizer and accumulation) is planned, the rest share the base
recipe's plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from encdec.launcher.recipe.errors import LaunchError

__all__ = ["FOOTPRINT_KEYS", "Footprint", "largest", "node_resources", "plan_footprints", "trial_footprint",
           "trials_that_fit"]

GiB = 1024**3
#: search keys whose value can change what a trial holds (a key equal to or under one of these)
FOOTPRINT_KEYS = ("cluster", "data", "model", "train.strategy", "train.zero_stage", "train.precision",
                  "train.activation_checkpointing", "optim.name", "optim.grad_accum")


@dataclass(frozen=True)
class Footprint:
    """What one trial holds while it runs."""

    nodes: int              # worker groups, each on a node of its own
    workers_per_node: int
    cpu_per_worker: float
    gpu_per_worker: float
    mem_per_worker: int     # bytes of host memory (the planner's estimate; 0 for GPU workers)
    driver_cpu: float       # the trial's own driver (tune.trial_cpus)
    label: str = "the recipe"   # which trial recipe this is (the base, or a search value)

    @property
    def group(self) -> dict[str, float]:
        """One node's share of the trial's workers."""
        w = self.workers_per_node
        return {"CPU": w * self.cpu_per_worker, "GPU": w * self.gpu_per_worker, "memory": float(w * self.mem_per_worker)}

    @property
    def cpus(self) -> float:
        return self.nodes * self.group["CPU"] + self.driver_cpu

    @property
    def gpus(self) -> float:
        return self.nodes * self.group["GPU"]

    @property
    def memory(self) -> int:
        return self.nodes * self.workers_per_node * self.mem_per_worker

    def describe(self) -> str:
        """``1 worker x 0.5 CPU + 0.5 CPU for its driver = 1 CPU, ~1.1 GiB``."""
        n = self.nodes * self.workers_per_node
        text = f"{n} worker{'s' if n > 1 else ''} x {self.cpu_per_worker:g} CPU"
        if self.gpu_per_worker:
            text += f" + {self.gpu_per_worker:g} GPU"
        text += f" + {self.driver_cpu:g} CPU for its driver = {self.cpus:g} CPU"
        if self.gpus:
            text += f", {self.gpus:g} GPU"
        if self.memory:
            text += f", ~{self.memory / GiB:.1f} GiB (planner)"
        if self.nodes > 1:
            text += f", on {self.nodes} nodes"
        return text


def trial_footprint(recipe: Any, plan: Any, driver_cpu: float, label: str = "the recipe") -> Footprint:
    """The footprint of a trial running ``recipe``, whose plan (``make_plan``) is ``plan``.

    ``recipe.cluster.gpus_per_worker`` must be resolved (``check_capacity`` does, against the cluster).
    """
    c = recipe.cluster
    gpus = float(c.gpus_per_worker if c.gpus_per_worker is not None else (1.0 if plan.on_gpu else 0.0))
    return Footprint(nodes=c.nodes, workers_per_node=c.workers_per_node, cpu_per_worker=float(c.cpus_per_worker),
                     gpu_per_worker=gpus, mem_per_worker=0 if gpus else int(plan.chosen_total()),
                     driver_cpu=float(driver_cpu), label=label)


def largest(prints: Sequence[Footprint]) -> Footprint:
    """The trial that needs the most: CPUs first, then GPUs, then memory."""
    return max(prints, key=lambda f: (f.cpus, f.gpus, f.memory, f.nodes))


def _relevant(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FOOTPRINT_KEYS)


def plan_footprints(base: Mapping[str, Any], spaces: Sequence[Any]) -> list[tuple[str, Any, Any]]:
    """``(label, recipe, plan)`` of the base recipe and of every value of a footprint key (``Space.probes``).

    Raises:
        RecipeError: a trial recipe whose model does not build (the planner's own message).
    """
    from encdec.launcher.commands.tune_trial import apply_values
    from encdec.launcher.preflight.plan import make_plan
    from encdec.launcher.recipe.validate import recipe_from_dict

    out = []
    todo: list[tuple[str, dict[str, Any]]] = [("the recipe", dict(base))]
    for space in spaces:
        if _relevant(space.key):
            todo += [(f"{space.key}={value!r}", apply_values(dict(base), {space.key: value})) for value in space.probes()]
    for label, data in todo:
        recipe = recipe_from_dict(data, source=label)
        out.append((label, recipe, make_plan(recipe)))
    return out


def node_resources(nodes: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """CPU, GPU and memory of each live node of ``ray.nodes()``."""
    return [{k: float(n.get("Resources", {}).get(k, 0.0)) for k in ("CPU", "GPU", "memory")}
            for n in nodes if n.get("Alive")]


def _take(free: dict[str, float], need: Mapping[str, float]) -> str | None:
    """Take ``need`` from ``free``; the first resource short (nothing taken then), or None."""
    for k, v in need.items():
        if v > free.get(k, 0.0) + 1e-9:
            return k
    for k, v in need.items():
        free[k] -= v
    return None


def _place(fp: Footprint, free: list[dict[str, float]]) -> str | None:
    """Place one trial (first fit: its driver, then each worker group on a node of its own); what was short."""
    trial = [dict(n) for n in free]
    short = None
    for node in trial:
        short = _take(node, {"CPU": fp.driver_cpu})
        if short is None:
            break
    else:
        return short or "CPU"
    used: set[int] = set()
    for _ in range(fp.nodes):
        short = "nodes"
        for i, node in enumerate(trial):
            if i in used:
                continue
            lack = _take(node, fp.group)
            if lack is None:
                used.add(i)
                short = None
                break
            short = lack
        if short is not None:
            return short
    free[:] = trial
    return None


def trials_that_fit(fp: Footprint, nodes: Sequence[Mapping[str, float]], max_concurrent: int) -> tuple[int, str | None]:
    """How many trials of footprint ``fp`` run at once on ``nodes`` (``node_resources``), at most ``max_concurrent``.

    Returns:
        The count and, when it is below ``max_concurrent``, why (one line).

    Raises:
        LaunchError: not even one trial fits; names the footprint, the cluster and the fixes.
    """
    free = [dict(n) for n in nodes]
    fits, short = 0, None
    while fits < max_concurrent:
        short = _place(fp, free)
        if short is not None:
            break
        fits += 1
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU", "memory")}
    have = f"{total['CPU']:g} CPU" + (f", {total['GPU']:g} GPU" if total["GPU"] else "") + (
        f", {total['memory'] / GiB:.1f} GiB" if fp.memory else "") + f" on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    if fits == 0:
        fix = {"CPU": "lower cluster.cpus_per_worker, cluster.workers_per_node or tune.trial_cpus",
               "GPU": "lower cluster.gpus_per_worker or cluster.workers_per_node (or set cluster.gpus_per_worker=0)",
               "memory": "a strategy that shards (train.strategy=fsdp), a smaller data.global_batch_size or "
                         "train.activation_checkpointing=true (see `encdec-launch plan`)",
               "nodes": "lower cluster.nodes"}[short or "CPU"]
        raise LaunchError(f"one trial ({fp.label}) needs {fp.describe()} but the cluster has {have}: not enough "
                          f"{'nodes' if short == 'nodes' else short}; {fix}, or join a bigger cluster with --address "
                          "(or --slurm)")
    if fits < max_concurrent:
        return fits, (f"tune.max_concurrent {max_concurrent} -> {fits}: one trial ({fp.label}) needs {fp.describe()} "
                      f"and the cluster has {have}; {fits} fit{'s' if fits == 1 else ''} at once ({short} runs out "
                      "first)")
    return fits, None
