"""A search's trial footprint comes from the planner (workers' CPUs/GPUs/memory plus the trial driver's CPU) and
is packed onto the cluster's nodes: ``max_concurrent`` is capped to what fits, with the reason; a trial that can
never fit is an error naming what it needs, what the cluster has and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from encdec.launcher.commands.tune_fit import (
    Footprint,
    largest,
    node_resources,
    plan_footprints,
    trial_footprint,
    trials_that_fit,
)
from encdec.launcher.commands.tune_space import parse_space
from encdec.launcher.recipe.errors import LaunchError

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3


def _node(cpu: float, gpu: float = 0.0, mem_gb: float = 64.0) -> dict[str, float]:
    return {"CPU": cpu, "GPU": gpu, "memory": mem_gb * GiB}


def _fp(nodes: int = 1, wpn: int = 1, cpu: float = 0.5, gpu: float = 0.0, mem_gb: float = 1.0,
        driver: float = 0.5) -> Footprint:
    return Footprint(nodes, wpn, cpu, gpu, int(mem_gb * GiB), driver)


@pytest.fixture(scope="module")
def plans() -> list:
    """The quickstart (1 worker) planned, and every value of a footprint key of the space; lr shares the base plan."""
    from encdec.launcher.recipe.validate import load_recipe

    base = load_recipe(str(REPO / "recipes" / "quickstart.yaml"), ["cluster.workers_per_node=1"]).to_yaml_dict()
    spaces = [parse_space("optim.lr", "choice(1e-9, 1e-3)"), parse_space("cluster.workers_per_node", "choice(1, 2)")]
    return plan_footprints(base, spaces)


def test_footprint_is_the_planners_estimate_plus_the_driver(plans: list) -> None:
    assert [label for label, _, _ in plans] == ["the recipe", "cluster.workers_per_node=1", "cluster.workers_per_node=2"]
    _, recipe, plan = plans[0]
    recipe.cluster.gpus_per_worker = 0.0
    fp = trial_footprint(recipe, plan, 0.5)
    assert fp.cpus == pytest.approx(1.0) and fp.gpus == 0
    assert fp.memory == plan.chosen_total() > GiB  # the planner's per-worker total (runtime included)
    assert "1 worker x 0.5 CPU + 0.5 CPU for its driver = 1 CPU" in fp.describe()
    prints = []
    for label, r, p in plans:
        r.cluster.gpus_per_worker = 0.0
        prints.append(trial_footprint(r, p, 0.5, label))
    big = largest(prints)
    assert big.label == "cluster.workers_per_node=2" and big.cpus == pytest.approx(1.5)
    assert big.memory == 2 * plans[2][2].chosen_total()
    # GPU workers: memory lives on the device (the plan checks it per GPU), the host share is not counted
    recipe.cluster.gpus_per_worker = 1.0
    gpu = trial_footprint(recipe, plan, 0.5)
    assert gpu.gpus == 1 and gpu.memory == 0


def test_two_cpu_machine_runs_what_fits_and_says_why() -> None:
    # quickstart's default: 2 workers x 0.5 CPU + 0.5 for the driver = 1.5 CPU; a 2-CPU machine holds one
    n, reason = trials_that_fit(_fp(wpn=2), [_node(2)], 4)
    assert n == 1
    assert reason is not None and "tune.max_concurrent 4 -> 1" in reason and "1.5 CPU" in reason
    assert "CPU runs out first" in reason
    assert trials_that_fit(_fp(), [_node(2)], 4)[0] == 2      # 1-CPU trials: two at once
    assert trials_that_fit(_fp(), [_node(2)], 2) == (2, None)  # what was asked fits: no reason
    assert trials_that_fit(_fp(), [_node(8)], 1) == (1, None)


def test_memory_caps_concurrency() -> None:
    n, reason = trials_that_fit(_fp(mem_gb=3.0), [_node(16, mem_gb=7.0)], 8)
    assert n == 2 and reason is not None and "memory runs out first" in reason and "~3.0 GiB (planner)" in reason


def test_multi_node_trials_spread_their_groups() -> None:
    # 2 nodes x 1 worker: each group on a node of its own, the driver anywhere
    fp = _fp(nodes=2)
    assert trials_that_fit(fp, [_node(2), _node(2)], 8)[0] == 2
    with pytest.raises(LaunchError) as err:
        trials_that_fit(fp, [_node(16)], 2)
    assert "not enough nodes" in str(err.value) and "cluster.nodes" in str(err.value)


def test_gpu_trials_count_gpus() -> None:
    fp = _fp(cpu=1.0, gpu=1.0, mem_gb=0.0)
    assert trials_that_fit(fp, [_node(16, gpu=2), _node(16, gpu=1)], 8)[0] == 3
    with pytest.raises(LaunchError, match="GPU") as err:
        trials_that_fit(fp, [_node(16)], 1)
    assert "cluster.gpus_per_worker" in str(err.value)


def test_a_trial_that_never_fits_is_an_error_before_any_trial() -> None:
    with pytest.raises(LaunchError) as err:
        trials_that_fit(_fp(wpn=2), [_node(1)], 1)
    text = str(err.value)
    assert "2 workers x 0.5 CPU + 0.5 CPU for its driver = 1.5 CPU" in text and "1 CPU, 64.0 GiB on 1 node" in text
    assert "tune.trial_cpus" in text and "cluster.cpus_per_worker" in text
    # the driver alone does not fit: the same error, not a search that waits for ever
    with pytest.raises(LaunchError, match="not enough CPU"):
        trials_that_fit(_fp(cpu=0.1, driver=2.0), [_node(1)], 1)


def test_node_resources_reads_live_nodes_only() -> None:
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 5.0}}, {"Alive": False, "Resources": {"CPU": 8.0}}]
    assert node_resources(nodes) == [{"CPU": 2.0, "GPU": 0.0, "memory": 5.0}]
