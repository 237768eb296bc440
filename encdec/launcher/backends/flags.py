"""The launch-target flags every command shares (``--slurm``, ``--k8s``, ``--submit``, the Slurm group), and the
command line an :class:`~encdec.launcher.backends.base.Entry` runs on a target, rebuilt from the parsed flags.

argparse only: ``--help`` imports neither torch nor ray.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["SLURM_FLAGS", "TARGET_DESTS", "absolute_path", "add_slurm_flags", "add_target_flags", "command_argv",
           "command_parser"]

# dest -> flag of the Slurm group (add_slurm_flags): meaningful with --slurm only
SLURM_FLAGS = {"partition": "--partition", "account": "--account", "time": "--time", "qos": "--qos",
               "constraint": "--constraint", "gpus_per_node": "--gpus-per-node", "cpus_per_task": "--cpus-per-task",
               "signal_grace_s": "--signal-grace-s", "extra": "--sbatch-extra", "venv": "--venv"}
# dests of the flags that choose and shape the target: the command a target runs never repeats them
TARGET_DESTS = frozenset({"slurm", "k8s", "submit", "no_follow", "address", "dry_run", *SLURM_FLAGS})


def add_slurm_flags(p: argparse.ArgumentParser) -> None:
    """The ``Slurm (with --slurm)`` group (they override the recipe's ``cluster.slurm``)."""
    g = p.add_argument_group("Slurm (with --slurm)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--time", help="time limit, e.g. 24:00:00")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--signal-grace-s", type=int, help="seconds before the limit when USR1 asks for a checkpoint")
    g.add_argument("--sbatch-extra", dest="extra", action="append", metavar="LINE",
                   help="extra #SBATCH line, e.g. --sbatch-extra=--exclusive (repeatable)")
    g.add_argument("--venv", help="virtualenv with encdec-launch on every node (default: this one)")


def add_target_flags(p: argparse.ArgumentParser, what: str = "the run") -> None:
    """``--submit``, ``--no-follow``, ``--slurm``, ``--k8s`` and the Slurm group, for a command that also has
    ``--address`` and ``--dry-run`` (each command words those two itself)."""
    p.add_argument("--submit", action="store_true", help=f"send {what} as a Ray Job to --address and follow it")
    p.add_argument("--no-follow", action="store_true", help="with --submit: return once the job is submitted")
    p.add_argument("--slurm", action="store_true", help=f"submit {what} to Slurm (sbatch) instead of running here")
    p.add_argument("--k8s", action="store_true",
                   help=f"write {what} as a KubeRay RayJob manifest (apply it with kubectl)")
    add_slurm_flags(p)


def absolute_path(value: str) -> str:
    """``value`` as a node elsewhere reads it: local paths absolute; URLs, ``/vsi...`` and ``~`` left as given."""
    if "://" in value or value.startswith(("/vsi", "~")):
        return value
    return str(Path(value).resolve()) if not os.path.isabs(value) else value


def command_parser(command: str) -> argparse.ArgumentParser:
    """The subcommand parser of ``encdec-launch COMMAND`` (its flags rebuild the command's line)."""
    from encdec.launcher.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]  # type: ignore[no-any-return]


def _long(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def command_argv(command: str, args: argparse.Namespace, *, drop: Iterable[str] = (),
                 path_dests: Iterable[str] = ()) -> list[str]:
    """``encdec-launch COMMAND ...`` that repeats ``args`` on another machine, without the target flags.

    Every flag of the command's parser is rebuilt from ``args``, so a flag added to a command later travels with
    it. Flags left at their default are not written.

    Args:
        command: the subcommand (``predict``, ``evaluate``, ``tune``...).
        args: its parsed flags.
        drop: more dests to leave out (beside :data:`TARGET_DESTS`).
        path_dests: dests holding local paths, made absolute (the target's working directory differs).
    """
    parser = command_parser(command)
    skip = TARGET_DESTS | set(drop)
    paths = set(path_dests)
    positionals: list[str] = []
    options: list[str] = []
    for action in parser._actions:
        if action.dest in skip or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        value = getattr(args, action.dest, None)
        fix: Callable[[Any], str] = absolute_path if action.dest in paths else str
        values = value if isinstance(value, list) else [value]
        if not action.option_strings:
            positionals += [fix(v) for v in values if v is not None]
        elif value is None or value == action.default:
            continue
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            options.append(_long(action))
        elif isinstance(action, argparse._AppendAction):
            for v in values:
                options += [_long(action), fix(v)]
        elif action.nargs in ("+", "*"):
            options += [_long(action), *(fix(v) for v in values)]
        elif action.nargs == "?" and value == action.const:
            options.append(_long(action))
        else:
            options += [_long(action), fix(value)]
    return ["encdec-launch", command, *positionals, *options]
