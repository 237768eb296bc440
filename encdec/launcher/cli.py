"""``encdec-launch`` command line: parse, then hand over to the module that does the work.

Imports stay lazy: ``--help`` imports neither torch nor ray (measured in tests/integration/test_cli.py).

::

    encdec-launch RECIPE.yaml [--nodes N] [--set k=v ...]        run (local Ray, --address, --submit, --slurm, --k8s)
    encdec-launch plan RECIPE.yaml --nodes 8                       validate + meta build + memory table
    encdec-launch recipe --schema | recipe check RECIPE.yaml
    encdec-launch status|logs|stop RUN_DIR|JOB_ID
    encdec-launch export RUN_DIR
    encdec-launch predict MODEL SCENES... -o OUT | evaluate MODEL --scenes ... --references ...
    encdec-launch convert-terratorch CONFIG.yaml
    encdec-launch make-data OUT --tiles N | stats TILES
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from encdec._version import __version__
from encdec.launcher.backends.flags import SLURM_FLAGS, add_slurm_flags, add_target_flags

__all__ = ["build_parser", "main"]

SUBCOMMANDS = ("run", "plan", "recipe", "status", "logs", "stop", "export", "convert-terratorch", "make-data", "stats",
               "predict", "evaluate", "tune")
EPILOG = """examples:
  encdec-launch recipes/quickstart.yaml                      train on a local Ray cluster started for the run
  encdec-launch recipes/prithvi_lora.yaml --nodes 8 --dry-run   plan: parameters, memory per strategy, launch spec
  encdec-launch recipes/prithvi_lora.yaml --nodes 8 --slurm     submit to Slurm (8 nodes, one Ray cluster)
  encdec-launch recipes/quickstart.yaml --set train.max_steps=50 --set optim.lr=3e-4
  encdec-launch --resume runs/quickstart-20250101-120000        continue a run from its last checkpoint
"""


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (typed and validated like the file); repeatable")
    p.add_argument("--nodes", type=int, help="nodes to run on (cluster.nodes)")
    p.add_argument("--workers-per-node", type=int, help="training workers per node (cluster.workers_per_node)")
    p.add_argument("--storage", help="run storage root (cluster.storage); shared by all nodes when nodes > 1")
    p.add_argument("--name", help="run name (run.name)")


def _run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="train a recipe (the default: `encdec-launch RECIPE.yaml` means `run`)",
                       description="Train a recipe on Ray Train workers.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe YAML (optional with --resume)")
    _add_recipe_flags(p)
    p.add_argument("--dry-run", action="store_true",
                   help="validate and plan only; print what would be launched (the sbatch script with --slurm)")
    p.add_argument("--address", help="join an existing Ray cluster (auto, HOST:PORT, or the dashboard URL with "
                   "--submit) instead of starting a local one")
    p.add_argument("--keep-cluster", action="store_true", help="leave the local Ray cluster running at exit")
    p.add_argument("--simulate-nodes", type=int, metavar="N",
                   help="start N Ray nodes on this machine (tries the multi-node path anywhere)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    p.add_argument("--run-dir", help="use exactly this run directory (continued if it has checkpoints); "
                   "what a Slurm job or a Ray Job runs")
    p.add_argument("--init-from", metavar="CKPT", help="start from a TerraTorch fine-tuned checkpoint (run.init_from)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the progress bar")
    p.add_argument("--ray-temp-dir", help="temp dir of the local Ray cluster (default /tmp/edray-XXXXXX)")
    p.add_argument("--dashboard-port", type=int, help="dashboard port of the local Ray cluster (default: free)")
    add_target_flags(p)  # --submit, --no-follow, --slurm, --k8s, the Slurm group


def _tune_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tune", help="hyperparameter search on Ray Tune (each trial a normal run)",
                       description="Search recipe values on Ray Tune: ASHA stops bad trials early; the result is a "
                       "table, results.csv, trials.png and best.yaml. Rerun the same command to continue a search.")
    p.add_argument("recipe")
    p.add_argument("--search", action="append", default=[], metavar="KEY=SPACE",
                   help="a space on a recipe key: choice(a,b,...), uniform(lo,hi), loguniform(lo,hi), randint(lo,hi); "
                   "repeatable (adds to tune.space)")
    p.add_argument("--trials", type=int, help="number of trials (tune.trials)")
    _add_recipe_flags(p)
    p.add_argument("--search-dir", help="where the search lives (default STORAGE/<run.name>-search)")
    p.add_argument("--resume", metavar="SEARCH_DIR", help="continue the search in SEARCH_DIR")
    p.add_argument("--address", help="join an existing Ray cluster instead of starting a local one")
    p.add_argument("--simulate-nodes", type=int, metavar="N", help="start N Ray nodes on this machine")
    p.add_argument("--no-progress", action="store_true", help="plain log lines")
    p.add_argument("--ray-temp-dir", help="temp dir of the local Ray cluster")
    p.add_argument("--dashboard-port", type=int, help="dashboard port of the local Ray cluster")
    p.add_argument("--slurm", action="store_true", help="submit the search to Slurm: one allocation, the search "
                   "inside it (follow it with status|logs|stop SEARCH_DIR)")
    add_slurm_flags(p)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (subcommands; a bare recipe path means ``run``)."""
    parser = argparse.ArgumentParser(
        prog="encdec-launch",
        description="Fine-tune geospatial foundation models (Prithvi-EO-2.0, timm backbones) on Ray Train "
        "workers sharded by DDP, FSDP2 or DeepSpeed ZeRO. `encdec-launch RECIPE.yaml [flags]` runs a recipe "
        "(see `encdec-launch run --help` for the flags).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"encdec-launch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _run_parser(sub)

    p = sub.add_parser("plan", help="validate a recipe, build it on the meta device and estimate memory")
    p.add_argument("recipe")
    _add_recipe_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("recipe", help="the recipe schema, or check a recipe")
    p.add_argument("--schema", action="store_true", help="print the recipe's JSON schema")
    p.add_argument("check", nargs="*", metavar="RECIPE", help="recipes to validate (schema and cross-field rules)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    for name, text in (("status", "state of a run (Ray Job or Slurm job)"), ("logs", "logs of a run"),
                       ("stop", "stop a run (it checkpoints first)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("target", metavar="RUN_DIR|JOB_ID")
        p.add_argument("--address", help="dashboard URL for a job id (default: the one the run recorded)")
        if name == "logs":
            p.add_argument("--tail", type=int, help="last N lines")
            p.add_argument("--follow", action="store_true", help="stream until the job ends")

    p = sub.add_parser("export", help="write the consolidated merged model of a run (safetensors + model block)")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the best, else the latest)")
    p.add_argument("--out", help="output directory (default RUN_DIR/export)")
    p.add_argument("--official-prithvi", action="store_true",
                   help="also write the backbone with official Prithvi key names")

    p = sub.add_parser("convert-terratorch", help="turn a TerraTorch (Lightning) config into a recipe")
    p.add_argument("config")
    p.add_argument("-o", "--output", help="recipe file to write (default: print)")
    p.add_argument("--allow-unmapped", action="store_true",
                   help="write the recipe even when settings that change the samples or their values do not map")

    from encdec.launcher.commands.predict_cmd import add_parsers  # argparse only: no torch/ray at import

    add_parsers(sub)
    _tune_parser(sub)
    sub.add_parser("make-data", help="write a synthetic HLS-like tile set", add_help=False)
    sub.add_parser("stats", help="per-band means/stds and class frequencies of tiles", add_help=False)
    return parser


def _run_flag_conflict(args: argparse.Namespace) -> str | None:
    """Flags of ``run`` that contradict each other (they would be silently ignored otherwise)."""
    if args.slurm and args.k8s:
        return "--slurm and --k8s both name the launch target; give one of them"
    target = "--slurm" if args.slurm else "--k8s" if args.k8s else None
    if target and (args.submit or args.address):
        return f"{target} starts its own Ray cluster; drop {'--submit' if args.submit else '--address'} (or {target})"
    if args.submit and not args.address:
        return ("--submit sends the run as a Ray Job to an existing cluster: give its dashboard, e.g. "
                "--submit --address http://HEAD:8265")
    if args.no_follow and not args.submit:
        return "--no-follow applies to --submit only (a Ray Job); drop it"
    given = [flag for dest, flag in SLURM_FLAGS.items() if getattr(args, dest, None) not in (None, [])]
    if given and not args.slurm:
        return f"{', '.join(given)} {'is a Slurm flag' if len(given) == 1 else 'are Slurm flags'}: add --slurm, or drop them"
    return None


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """``encdec-launch RECIPE ...`` and ``encdec-launch --resume DIR`` mean ``run``."""
    argv = list(argv)
    if not argv:
        return argv
    first = argv[0]
    if first in SUBCOMMANDS or first in ("-h", "--help", "--version"):
        return argv
    return ["run", *argv]


def _dispatch(command: str) -> Callable[[argparse.Namespace], int]:
    if command == "run":
        from encdec.launcher.commands.launch import run_command

        return run_command
    if command == "plan":
        from encdec.launcher.commands.launch import plan_command

        return plan_command
    if command == "recipe":
        from encdec.launcher.commands.launch import recipe_command

        return recipe_command
    if command in ("status", "logs", "stop"):
        from encdec.launcher.commands import follow

        return getattr(follow, f"{command}_command")  # type: ignore[no-any-return]
    if command == "export":
        from encdec.launcher.commands.export_cmd import export_command

        return export_command
    if command == "predict":
        from encdec.launcher.commands.predict_cmd import predict_command

        return predict_command
    if command == "evaluate":
        from encdec.launcher.commands.evaluate_cmd import evaluate_command

        return evaluate_command
    if command == "tune":
        from encdec.launcher.commands.tune_cmd import tune_command

        return tune_command
    if command == "convert-terratorch":
        from encdec.launcher.commands.convert_terratorch import convert_command

        return convert_command
    raise SystemExit(f"unknown command {command}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``encdec-launch`` console script. Returns the exit status."""
    args_in = _normalise_argv(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] in ("make-data", "stats"):
        from encdec.data import commands  # the data package owns these commands and their flags

        return int(getattr(commands, args_in[0].replace("-", "_"))(args_in[1:]))
    parser = build_parser()
    if not args_in:
        parser.print_help()
        return 0
    args = parser.parse_args(args_in)
    if args.command == "run" and not args.recipe and not args.resume and not args.run_dir:
        parser.error("give a recipe (encdec-launch RECIPE.yaml) or --resume RUN_DIR")
    if args.command == "run" and (conflict := _run_flag_conflict(args)) is not None:
        print(f"error: {conflict}", file=sys.stderr)
        return 2
    from encdec.launcher.recipe.errors import LaunchError, RecipeError

    try:
        return int(_dispatch(args.command)(args))
    except RecipeError as err:
        print(str(err), file=sys.stderr)
        return 2
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
