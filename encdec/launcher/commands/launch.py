"""The ``run``, ``plan`` and ``recipe`` commands: from a recipe file to a finished (or submitted) run.

Order, so nothing expensive happens before a cheap check fails: recipe (schema, overrides, cross-field rules)
-> registry names and the meta-device build with a dummy batch (the plan) -> where to run (dry run, Slurm,
Kubernetes, Ray Job, an existing cluster, or a local cluster started here) -> cluster capacity and shared
storage -> a new run directory -> ``TorchTrainer.fit`` -> metrics.csv, plot, export, summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encdec.launcher.backends.base import Entry
from encdec.launcher.recipe.errors import LaunchError
from encdec.launcher.recipe.overrides import FLAG_PATHS

__all__ = ["load_for_run", "plan_command", "recipe_command", "run_command", "train_entry"]


def _console(stderr: bool = False) -> Any:
    from encdec.launcher.report import make_console

    return make_console(stderr=stderr)  # logs and CI: no colour codes, paths not cut at 80 columns


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = {path: getattr(args, dest, None) for dest, path in FLAG_PATHS.items()}
    sim = getattr(args, "simulate_nodes", None)
    if sim and flags["cluster.nodes"] is None:
        flags["cluster.nodes"] = sim
    return flags


def _absolute(value: str | None, base: Path) -> str | None:
    if value is None or "://" in value or value.startswith("~"):
        return os.path.expanduser(value) if value else value
    p = Path(value)
    return str(p if p.is_absolute() else (base / p).resolve())


def absolutize_paths(recipe: Any, base: Path) -> None:
    """Make relative paths absolute against ``base`` (the launch's working directory): workers run elsewhere."""
    for split in ("train", "val", "test"):
        src = getattr(recipe.data, split)
        if src is None:
            continue
        for key in ("tiles", "scenes"):
            val = getattr(src, key)
            if isinstance(val, list):
                setattr(src, key, [_absolute(v, base) for v in val])
            elif val is not None:
                setattr(src, key, _absolute(val, base))
        for key in ("manifest", "image_root", "label_root", "split_file"):
            if getattr(src, key) is not None:
                setattr(src, key, _absolute(getattr(src, key), base))
    recipe.run.init_from = _absolute(recipe.run.init_from, base)
    recipe.cluster.storage = _absolute(recipe.cluster.storage, base) or recipe.cluster.storage
    extra = recipe.model.model_extra or {}
    if isinstance(extra.get("backbone_ckpt_path"), str):
        extra["backbone_ckpt_path"] = _absolute(extra["backbone_ckpt_path"], base)


def load_for_run(args: argparse.Namespace) -> tuple[Any, Path | None, str]:
    """The recipe to run, the existing run directory to continue (or None) and where the recipe came from."""
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.launcher.rundir import RECIPE_FILE, is_run_dir

    existing: Path | None = None
    recipe_path = args.recipe
    if getattr(args, "resume", None):
        existing = Path(args.resume).resolve()
        if not is_run_dir(existing):
            raise LaunchError(f"--resume {args.resume}: not a run directory (no {RECIPE_FILE}); give the directory "
                              "a launch created, e.g. runs/quickstart-20250101-120000")
        recipe_path = str(existing / RECIPE_FILE)  # the run's own resolved recipe; --set may still extend it
        if args.recipe:
            _same_recipe_or_refuse(args, existing)
    elif getattr(args, "run_dir", None):
        existing = Path(args.run_dir).resolve()
        if recipe_path is None:
            if not is_run_dir(existing):
                raise LaunchError(f"--run-dir {args.run_dir} has no {RECIPE_FILE}; give the recipe too")
            recipe_path = str(existing / RECIPE_FILE)
    recipe = load_recipe(recipe_path, args.overrides, flags=_flags(args))
    absolutize_paths(recipe, Path.cwd())
    return recipe, existing, recipe_path


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: data}


def _same_recipe_or_refuse(args: argparse.Namespace, run_dir: Path) -> None:
    """``RECIPE --resume RUN``: a resumed run continues with its own ``recipe.yaml``; a RECIPE that says otherwise
    would be silently ignored, so it must match (both with the same ``--set``/flags applied)."""
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.launcher.rundir import RECIPE_FILE

    given = load_recipe(args.recipe, args.overrides, flags=_flags(args))
    absolutize_paths(given, Path.cwd())
    run = load_recipe(run_dir / RECIPE_FILE, args.overrides, flags=_flags(args))
    absolutize_paths(run, Path.cwd())  # as load_for_run does (a run's own recipe is absolute already)
    mine, theirs = _leaves(run.to_yaml_dict()), _leaves(given.to_yaml_dict())
    differ = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differ:
        shown = ", ".join(f"{k} (run: {mine.get(k)!r}, {Path(args.recipe).name}: {theirs.get(k)!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise LaunchError(f"--resume {args.resume} continues with the run's own {run_dir / RECIPE_FILE}, but "
                          f"{args.recipe} differs at {shown}{more}; change a value of the resumed run with --set "
                          f"KEY=VALUE (recorded in its recipe.yaml), or drop --resume to start a new run from "
                          f"{args.recipe}")


def prepare_synthetic(recipe: Any, console: Any) -> None:
    """Write the synthetic tiles a recipe asks for (``data.<split>.synthetic``) when their folder has none."""
    for split in ("train", "val", "test"):
        src = getattr(recipe.data, split)
        if src is None or src.synthetic is None:
            continue
        folder = Path(src.tiles)
        if folder.is_dir() and any(folder.glob(f"*{src.image_suffix}")):
            continue
        from encdec.data.synthetic import write_tiles

        t0 = time.perf_counter()
        s = src.synthetic
        write_tiles(folder, s.n_tiles, img_size=recipe.data.img_size, seed=s.seed, task=s.task,
                    num_frames=recipe.data.num_frames)
        console.print(f"wrote {s.n_tiles} synthetic {split} tiles to {folder} ({time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------------------------------------------- plan
def plan_command(args: argparse.Namespace) -> int:
    """``encdec-launch plan RECIPE``: validate, build on meta, print the memory table."""
    from encdec.launcher.preflight.plan import make_plan
    from encdec.launcher.preflight.plan_view import render_plan
    from encdec.launcher.recipe.validate import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, flags=_flags(args))
    plan = make_plan(recipe)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        render_plan(plan, _console(), title=Path(args.recipe).name)
    return 0


def recipe_command(args: argparse.Namespace) -> int:
    """``encdec-launch recipe --schema`` / ``recipe RECIPE...`` (validate only: schema and cross-field rules)."""
    from encdec.launcher.recipe.errors import RecipeError
    from encdec.launcher.recipe.schema import json_schema
    from encdec.launcher.recipe.validate import load_recipe

    if args.schema:
        print(json.dumps(json_schema(), indent=2))
        return 0
    if not args.check:
        print("give --schema or recipe files to check", file=sys.stderr)
        return 2
    from encdec.launcher.preflight.static_checks import DRY_RUN_ONLY, STATIC_CHECKS, static_checks

    status = 0
    for path in args.check:
        try:
            recipe = load_recipe(path, args.overrides)
            issues = static_checks(recipe)  # registry names, backbone_* names, channels: no model build
            if issues:
                raise recipe.error(issues)
            print(f"{path}: ok ({STATIC_CHECKS})")
        except RecipeError as err:
            print(str(err), file=sys.stderr)
            status = 2
    if status == 0:
        print(f"not checked here, only by --dry-run or `encdec-launch plan`: {DRY_RUN_ONLY}")
    return status


# ---------------------------------------------------------------------------------------------------- run
def check_data(recipe: Any, console: Any, *, strict: bool = True) -> None:
    """The data preflight (``encdec.data.preflight``) on this machine, before any cluster starts: warnings are
    printed; errors stop the launch (``strict``) or are printed as warnings (data only the cluster sees)."""
    from encdec.data.preflight import preflight

    synthetic = [s for s in ("train", "val", "test") if getattr(getattr(recipe.data, s), "synthetic", None)]
    report = preflight(recipe.data, skip=synthetic)
    for split, n in report.samples.items():
        d = report.details.get(split, {})
        nd = d.get("nodata_fraction")
        console.print(f"data.{split}: {n} samples; {d.get('read', 0)} read: dtype {','.join(d.get('dtypes', [])) or '-'}"
                      f", nodata {'-' if nd is None else f'{nd:.1%}'}", highlight=False)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    if report.errors and strict:
        raise LaunchError("the data cannot be used:\n  " + "\n  ".join(report.errors))
    for e in report.errors:
        console.print(f"[yellow]warning (not visible from here; the cluster must see it):[/yellow] {e}",
                      highlight=False)


def train_entry(recipe: Any, plan: Any) -> Entry:
    """Training as a launch entry: ``encdec-launch RECIPE --run-dir RUN_DIR`` on a target's node, or the Ray
    driver in this process (local cluster, ``--address``)."""

    def argv(run_dir: Path, recipe_path: str) -> list[str]:
        # --run-dir: exactly this directory, continued from its last checkpoint when it has one (a requeued job);
        # --no-progress: plain log lines, the job's output is a file
        return ["encdec-launch", recipe_path, "--run-dir", str(run_dir), "--no-progress"]

    def run_here(make_run_dir: Callable[[], Path], args: argparse.Namespace, console: Any) -> int:
        from encdec.launcher.ray.local_run import run_on_ray

        # the run directory is made once the cluster is known to fit the recipe
        return run_on_ray(recipe, make_run_dir, plan, args, console)

    return Entry(name="train", recipe=recipe, argv=argv, run_here=run_here, plan=plan)


def run_command(args: argparse.Namespace) -> int:
    """``encdec-launch RECIPE [flags]``."""
    from encdec.launcher.backends.base import backend_for_args
    from encdec.launcher.preflight.init_from import check_init_from
    from encdec.launcher.preflight.plan import make_plan
    from encdec.launcher.preflight.plan_view import render_launch, render_plan
    from encdec.launcher.ray.driver import run_spec, scaling_spec
    from encdec.launcher.rundir import latest_checkpoint

    console = _console()
    recipe, existing, recipe_path = load_for_run(args)
    plan = make_plan(recipe)
    if existing is None or latest_checkpoint(existing) is None:  # resuming: the run's checkpoint wins, unread
        check_init_from(recipe)
    backend = backend_for_args(args)
    entry = train_entry(recipe, plan)
    # Data paths are checked on this machine, before any cluster starts; where only the cluster reads them (Slurm
    # nodes, a Ray Job, Kubernetes pods) what is missing here is a warning.
    if args.dry_run:
        if recipe.cluster.gpus_per_worker is None:  # auto: shown as this machine would decide it
            recipe.cluster.gpus_per_worker = 1.0 if plan.on_gpu else 0.0
        preview = existing or Path(recipe.cluster.storage) / f"{recipe.run.name}-<timestamp>"
        script = backend.preview(entry, preview)
        # a script or manifest is stdout's only content (`--k8s --dry-run | kubectl apply -f -`); the rest: stderr
        shown = _console(stderr=True) if script is not None else console
        render_plan(plan, shown, title=Path(recipe_path).name)
        render_launch(shown, scaling_spec(recipe), run_spec(recipe, preview), backend.where())
        local_nodes = args.simulate_nodes or 1
        if backend.mode == "local" and recipe.cluster.nodes > local_nodes:
            shown.print(f"[yellow]note:[/yellow] the local cluster has {local_nodes} node(s) but the recipe asks for "
                        f"{recipe.cluster.nodes}: launch with --slurm, --address HOST:PORT (an existing cluster) or "
                        f"--simulate-nodes {recipe.cluster.nodes} (all on this machine)")
        check_data(recipe, shown, strict=backend.strict_data)
        if script is not None:
            sys.stdout.write(script if script.endswith("\n") else script + "\n")
        return 0
    check_data(recipe, console, strict=backend.strict_data)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")

    def make_run_dir() -> Path:
        run_dir = open_run_dir(recipe, existing, backend.mode)
        console.print(f"run directory: {run_dir}")
        return run_dir

    if backend.writes_synthetic_here:
        prepare_synthetic(recipe, console)
    return backend.submit(entry, make_run_dir, console)


def open_run_dir(recipe: Any, existing: Path | None, mode: str) -> Path:
    """The run directory: ``existing`` (continued; created with the recipe if empty), else a new one."""
    from encdec.launcher.rundir import new_run_dir, record_recipe, update_launch, write_run_files

    if existing is None:
        run_dir = new_run_dir(recipe.cluster.storage, recipe.run.name)
        write_run_files(run_dir, recipe.to_yaml_dict(), {"mode": mode})
        return run_dir
    existing.mkdir(parents=True, exist_ok=True)
    if not (existing / "recipe.yaml").is_file():
        write_run_files(existing, recipe.to_yaml_dict(), {"mode": mode})
    else:
        # --resume RUN --set k=v: the run now trains with the new values, so its recipe.yaml says so (a Slurm or
        # Kubernetes job reads that file); the replaced one stays as recipe.prev-N.yaml
        prev = record_recipe(existing, recipe.to_yaml_dict())
        changed = {"recipe_replaced": prev.name} if prev is not None else {}
        update_launch(existing, resumed=time.strftime("%Y-%m-%dT%H:%M:%S"), **changed)
    return existing
