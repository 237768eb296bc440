"""``encdec-launch tune RECIPE --search KEY=SPACE ... --trials N``: a hyperparameter search on Ray Tune.

Order: recipe and every search key validated (no cluster touched) -> the search directory (rerunning the same
command continues it; one that finished prints its table at once) -> every trial recipe the space can make
planned on the meta device (``tune_fit``) -> the target, through the ``Backend`` protocol like a run: the search
runs here (local cluster, ``--address``) or, with ``--slurm``, this same command runs inside one Slurm allocation
-> the cluster and the fit check (the largest trial's footprint: its workers as the planner sizes them plus its
own driver CPU; ``max_concurrent`` capped to what fits) -> the parent MLflow run (``tune_track``, with
``track.mlflow``) -> ``Tuner.fit`` (or ``Tuner.restore``: finished trials are not rerun) -> the table of trials
in the terminal and ``results.csv``, ``trials.png`` (metric vs step per trial) and ``best.yaml`` (the winning
recipe, which trains with ``encdec-launch best.yaml``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

from encdec.launcher.recipe.errors import LaunchError

__all__ = ["tune_command"]

SPEC_FILE = "search.json"
RESULTS = "results.csv"


def _metric(recipe: Any) -> tuple[str, str]:
    """The search metric and mode: tune.metric/mode, else train.best_metric/best_mode, else the task's default."""
    from encdec.config import BEST_DEFAULTS

    t, train = recipe.tune, recipe.train
    default_metric, default_mode = BEST_DEFAULTS[recipe.task]
    metric = t.metric or train.best_metric or default_metric
    if t.mode:
        return metric, t.mode
    if metric == train.best_metric and train.best_mode:
        return metric, train.best_mode
    if metric == default_metric:
        return metric, default_mode
    return metric, "min" if any(w in metric for w in ("loss", "rmse", "mae")) else "max"


def tune_command(args: argparse.Namespace) -> int:
    """Run (or continue, or submit with ``--slurm``) a search; returns the exit status."""
    from encdec.config.tune import TuneConfig
    from encdec.launcher.backends.base import backend_for_args
    from encdec.launcher.commands.launch import _console, _flags, absolutize_paths, open_run_dir, prepare_synthetic
    from encdec.launcher.commands.tune_fit import plan_footprints
    from encdec.launcher.commands.tune_space import parse_search_args, validate_spaces
    from encdec.launcher.recipe.validate import load_recipe

    console = _console()
    recipe = load_recipe(args.recipe, args.overrides, flags=_flags(args))
    absolutize_paths(recipe, Path.cwd())
    if recipe.tune is None:
        recipe.tune = TuneConfig.model_validate({})
    if args.trials:
        recipe.tune.trials = args.trials
    spaces_text = {**recipe.tune.space, **parse_search_args(args.search or [])}
    if not spaces_text:
        raise LaunchError("nothing to search: give --search KEY=SPACE (e.g. --search 'optim.lr=loguniform(1e-5,1e-3)') "
                          "or a tune.space section")
    spaces = validate_spaces(args.recipe, args.overrides, spaces_text, flags=_flags(args))
    if recipe.data.val is None:
        raise LaunchError("a search compares trials on a validation metric: the recipe needs data.val")
    metric, mode = _metric(recipe)
    t = recipe.tune
    t.space = spaces_text  # the search's recipe.yaml holds the whole space (what a Slurm job reads back)
    base = recipe.to_yaml_dict()
    base.pop("tune", None)
    spec: dict[str, Any] = {"recipe": base, "space": spaces_text, "trials": t.trials, "metric": metric, "mode": mode,
            "scheduler": t.scheduler, "search": t.search, "seed": recipe.run.seed}
    search_dir = Path(args.resume or args.search_dir or Path(recipe.cluster.storage) / f"{recipe.run.name}-search")
    search_dir = search_dir.resolve()
    if (search_dir / SPEC_FILE).is_file():
        old = json.loads((search_dir / SPEC_FILE).read_text())
        if args.resume:
            spec = old
        elif old != json.loads(json.dumps(spec)):
            raise LaunchError(f"{search_dir} holds another search (its recipe, space or settings differ); give "
                              "--search-dir NEW_DIR or --name, or continue it with --resume " + str(search_dir))
        if (search_dir / RESULTS).is_file():
            console.print(f"search {search_dir} has finished: nothing to rerun")
            _show(console, search_dir, spec)
            return 0
    # every trial recipe the space can make is planned before any cluster: a model that does not build fails here
    plans = plan_footprints(spec["recipe"], spaces)
    for w in plans[0][2].warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    backend = backend_for_args(args)

    def make_search_dir() -> Path:
        open_run_dir(recipe, search_dir, backend.mode)  # recipe.yaml + launch.json: status|logs|stop SEARCH_DIR
        (search_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        return search_dir

    def argv(run_dir: Path, recipe_path: str) -> list[str]:
        # the search inside a Slurm allocation: the same command, on the search's own recipe.yaml, in its directory
        return ["encdec-launch", "tune", recipe_path, "--search-dir", str(run_dir), "--no-progress"]

    def run_here(make_dir: Any, run_args: argparse.Namespace, out: Any) -> int:
        return _search_here(recipe, spec, spaces, plans, make_dir(), run_args, out)

    if backend.writes_synthetic_here:
        prepare_synthetic(recipe, console)
    from encdec.launcher.backends.base import Entry

    return backend.submit(Entry(name="tune", recipe=recipe, argv=argv, run_here=run_here), make_search_dir, console)


def _search_here(recipe: Any, spec: dict[str, Any], spaces: list[Any], plans: list[Any], search_dir: Path,
                 args: argparse.Namespace, console: Any) -> int:
    """The search driven from this process: connect, parent MLflow run, ``Tuner.fit``, results."""
    from encdec.launcher.ray.local_run import connect

    args.keep_cluster = False
    parent = None
    mlflow_cfg = recipe.track.mlflow if recipe.track is not None else None
    if mlflow_cfg is not None:
        from encdec.launcher.commands.tune_track import SearchParent

        parent = SearchParent(mlflow_cfg, search_dir, recipe.run.name,
                              report=lambda m: console.print(f"[yellow]{m}[/yellow]"))
    cluster, _ = connect(args, recipe, console)
    try:
        concurrent = _concurrency(recipe, plans, console)
        trial_parent = parent.open(spec) if parent is not None else None
        rows = _run_search(recipe, spec, spaces, search_dir, console, concurrent, trial_parent)
    finally:
        import ray

        ray.shutdown()
        if cluster is not None:
            cluster.stop()
    top = _write_results(search_dir, rows, spec)
    if parent is not None:
        parent.finish(top, spec["metric"], [search_dir / n for n in ("best.yaml", RESULTS, "trials.png")])
    best = _show(console, search_dir, spec)
    if best is None:
        console.print("[red]no trial reported the metric[/red]")
        return 1
    return 0


def _concurrency(recipe: Any, plans: list[Any], console: Any) -> int:
    """Trials at once: the largest trial's footprint (planner) packed onto the cluster; LaunchError when none fits."""
    import ray

    from encdec.launcher.commands.tune_fit import largest, node_resources, trial_footprint, trials_that_fit
    from encdec.launcher.ray.driver import check_capacity

    check_capacity(recipe)  # nodes, CPUs, GPUs of one run; resolves cluster.gpus_per_worker (auto)
    prints = []
    for label, trial_recipe, plan in plans:
        if trial_recipe.cluster.gpus_per_worker is None:
            trial_recipe.cluster.gpus_per_worker = recipe.cluster.gpus_per_worker
        prints.append(trial_footprint(trial_recipe, plan, recipe.tune.trial_cpus, label))
    fp = largest(prints)
    n, reason = trials_that_fit(fp, node_resources(ray.nodes()), recipe.tune.max_concurrent)
    if reason:
        console.print(reason)
    return n


def _run_search(recipe: Any, spec: dict[str, Any], spaces: list[Any], search_dir: Path, console: Any,
                concurrent: int, parent: dict[str, str] | None) -> list[dict[str, Any]]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from encdec.launcher.commands.tune_trial import run_trial

    t = recipe.tune
    metric, mode = spec["metric"], spec["mode"]
    max_steps = int(recipe.train.max_steps or 10**9)
    scheduler = None
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=max_steps, reduction_factor=2,
                                  grace_period=t.grace_steps or recipe.train.val_every)
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(seed=recipe.run.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a generator passed in: the generator must carry the limit
        search_alg = BasicVariantGenerator(random_state=recipe.run.seed, max_concurrent=concurrent)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=spec["recipe"], search_dir=str(search_dir), metric=metric,
                             parent=parent),
        {"CPU": t.trial_cpus})
    path = search_dir / "tune"
    console.print(f"search {search_dir}: {t.trials} trials of {', '.join(s.key for s in spaces)}, {concurrent} at a "
                  f"time, {metric} ({mode}), scheduler {t.scheduler}, search {t.search}")
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        from ray.tune import RunConfig

        tuner = tune.Tuner(
            trainable, param_space={s.key: s.domain() for s in spaces},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=t.trials, scheduler=scheduler,
                                        search_alg=search_alg, max_concurrent_trials=concurrent),
            run_config=RunConfig(name="tune", storage_path=str(search_dir), verbose=0),
        )
    grid = tuner.fit()
    rows = []
    for i in range(len(grid)):
        result = grid[i]
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        run_dir = search_dir / "runs" / trial_id
        rows.append(_row(result.config or {}, run_dir, metric, mode, max_steps, result.error))
    return rows


def _trial_id_from_path(path: str | None) -> str:
    """Tune's trial folder is ``<trainable>_<trial id>_<index>_<params>``; the id has no underscore."""
    import re

    m = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path or "").name)
    return m.group(1) if m else "?"


def _row(config: dict[str, Any], run_dir: Path, metric: str, mode: str, max_steps: int, error: Any) -> dict[str, Any]:
    from encdec.launcher.report import metric_rows

    history = metric_rows(run_dir / "metrics.jsonl")
    values = [(int(r["step"]), float(r[metric])) for r in history if isinstance(r.get(metric), (int, float))]
    finite = [v for _, v in values if math.isfinite(v)]
    best = (min if mode == "min" else max)(finite) if finite else None
    last_step = int(history[-1]["step"]) if history else 0
    if error is not None:
        status = "error"
    elif history and history[-1].get("status") == "early-stopped":
        status = "early-stopped"
    elif last_step >= max_steps:
        status = "finished"
    else:
        status = "stopped by ASHA"
    return {**{k: config.get(k) for k in sorted(config)}, "best": best, "steps": last_step, "status": status,
            "run_dir": str(run_dir), "curve": values}


def _write_results(search_dir: Path, rows: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any] | None:
    """results.csv, best.yaml and trials.png; returns the best row (None when no trial reported the metric)."""
    import yaml

    from encdec.launcher.commands.tune_trial import apply_values

    keys = list(spec["space"])
    with open(search_dir / RESULTS, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*keys, "best", "steps", "status", "run_dir"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    ranked = [r for r in rows if r["best"] is not None]
    top = None
    if ranked:
        top = (min if spec["mode"] == "min" else max)(ranked, key=lambda r: r["best"])
        best = apply_values(spec["recipe"], {k: top[k] for k in keys})
        best["run"]["name"] = f"{best['run']['name']}-best"
        (search_dir / "best.yaml").write_text(
            f"# best of {len(rows)} trials: {spec['metric']} = {top['best']:.6g} ({top['run_dir']})\n"
            + yaml.safe_dump(best, sort_keys=False))
    _plot(search_dir / "trials.png", rows, spec["metric"], keys)
    return top


def _plot(path: Path, rows: list[dict[str, Any]], metric: str, keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, "o-", label=", ".join(f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                                                 for k in keys) + f" ({r['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _show(console: Any, search_dir: Path, spec: dict[str, Any]) -> dict[str, str] | None:
    from rich.table import Table

    rows = list(csv.DictReader(open(search_dir / RESULTS)))
    keys = list(spec["space"])
    table = Table(title=f"trials ({spec['metric']}, {spec['mode']})", title_justify="left")
    for col in [*keys, f"best {spec['metric']}", "steps", "status"]:
        table.add_column(col)
    for r in rows:
        table.add_row(*[r[k] for k in keys], r["best"] or "-", r["steps"], r["status"])
    console.print(table)
    ranked = [r for r in rows if r["best"]]
    if not ranked:
        return None
    console.print(f"results: {search_dir / RESULTS}; curves: {search_dir / 'trials.png'}; best recipe: "
                  f"{search_dir / 'best.yaml'} (train it with `encdec-launch {search_dir / 'best.yaml'}`)")
    return (min if spec["mode"] == "min" else max)(ranked, key=lambda r: float(r["best"]))
