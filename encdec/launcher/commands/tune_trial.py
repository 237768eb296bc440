"""One trial of a search: the base recipe with the trial's values, trained as a normal run, reports forwarded to Tune.

Runs inside a Ray Tune trial (an actor, in a thread of it). The run is the usual driver ``fit``: its own run
directory under the search's ``runs/``, its own TorchTrainer, workers and strategy. Under Ray Train V2 Tune does
not see the Train run's reports, so each report of rank 0 that carries the search metric is passed on with
``ray.tune.report`` - which is what ASHA reads to stop a trial. A trial restarted after the search was interrupted
finds its run directory and continues from its newest checkpoint (the workers always resume when one exists).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from encdec.config.checks import is_number

__all__ = ["apply_values", "run_trial"]


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The base recipe data with ``{"optim.lr": 1e-3, ...}`` set (a deep copy)."""
    import copy

    data = copy.deepcopy(base)
    for key, value in values.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def run_trial(config: dict[str, Any], *, base: dict[str, Any], search_dir: str, metric: str,
              parent: dict[str, str] | None = None) -> None:
    """Tune's function trainable: train the trial's recipe and forward its validation reports.

    ``parent``: the search's parent MLflow run (``tune_track.SearchParent``); the trial's MLflow run is its child.
    """
    from ray import tune
    from rich.console import Console

    from encdec.launcher.commands.launch import open_run_dir
    from encdec.launcher.ray.driver import check_capacity, fit
    from encdec.launcher.ray.local_run import finish_run
    from encdec.launcher.recipe.validate import recipe_from_dict

    trial_id = tune.get_context().get_trial_id()
    data = apply_values(base, config)
    if parent is not None and (data.get("track") or {}).get("mlflow") is not None:
        from encdec.launcher.commands.tune_track import child_track

        data["track"] = child_track(data["track"], parent, trial_id)
    recipe = recipe_from_dict(data, source=f"trial {trial_id}")
    recipe.run.name = f"trial-{trial_id}"
    check_capacity(recipe)
    run_dir = open_run_dir(recipe, Path(search_dir) / "runs" / trial_id, "tune")

    from encdec.track import open_tracker

    # a trial is tracked like any run (track:): its own TensorBoard folder / MLflow run / W&B run
    tracker = open_tracker(recipe.track, run_dir, recipe.to_yaml_dict())

    def forward(m: dict[str, Any]) -> None:
        if tracker is not None:
            tracker.log(m)
        if isinstance(m.get(metric), (int, float)):
            tune.report({k: v for k, v in m.items() if is_number(v)})

    outcome = fit(recipe, run_dir, on_metrics=forward)
    finish_run(recipe, run_dir, outcome, Console(file=io.StringIO(), width=160), tracker=tracker)
    if outcome.error is not None:
        raise outcome.error
