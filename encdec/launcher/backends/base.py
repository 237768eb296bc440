"""The one ``Backend`` protocol every launch target implements, and the one place that picks a target.

A target is where a command runs: the embedded local Ray cluster, an existing Ray cluster (``--address``), a Ray
Job (``--submit``), Slurm (``--slurm``) or Kubernetes (``--k8s``). The command is an :class:`Entry` (train today;
export, predict, evaluate next), so a new command reaches every target through one ``Backend.submit`` call.
``status|logs|stop`` read the run's ``launch.json`` ``mode`` and call the same backend: no if-chains on modes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from encdec.launcher.recipe.errors import LaunchError

__all__ = ["BACKENDS", "Backend", "Entry", "Run", "backend_for_args", "backend_for_run"]


@dataclass
class Entry:
    """A command as every target runs it.

    ``argv(run_dir, recipe_path)``: the command (``encdec-launch ...``) that runs it in ``run_dir`` on a node of the
    target, given the recipe file as that node sees it (Slurm's batch script, a Ray Job's entrypoint and a RayJob
    manifest append ``--address ...`` when ``needs_ray_address``).
    ``run_here(make_run_dir, args, console)``: the same command in this process, for the targets that drive Ray
    from here (local cluster, ``--address``); it makes the run directory once the cluster is known to fit.
    """

    name: str
    recipe: Any
    argv: Callable[[Path, str], list[str]]
    run_here: Callable[[Callable[[], Path], argparse.Namespace, Any], int]
    needs_ray_address: bool = True   # the entry joins the target's Ray cluster (``--address auto``)


@dataclass
class Run:
    """A launched run as ``status|logs|stop`` find it: its directory (None for a bare job id) and launch record."""

    run_dir: Path | None
    launch: dict[str, Any] = field(default_factory=dict)
    address: str | None = None   # --address of status|logs|stop (a dashboard URL)


class Backend(Protocol):
    """A launch target."""

    mode: str              # recorded as launch.json ``mode``
    strict_data: bool      # data paths must be readable here (False: only the cluster sees them)
    writes_synthetic_here: bool   # the recipe's synthetic tiles are written from this machine before submit

    def where(self) -> str:
        """Where the run goes, in words (the dry run shows it)."""

    def submit(self, entry: Entry, make_run_dir: Callable[[], Path], console: Any) -> int:
        """Run or submit ``entry``; returns the exit status of the launch."""

    def preview(self, entry: Entry, run_dir: Path) -> str | None:
        """What ``--dry-run`` prints for this target (a script, a manifest), or None."""

    def status(self, run: Run) -> str:
        """The run's state in one or two lines."""

    def logs(self, run: Run, *, tail: int | None, follow: bool, out: IO[str]) -> None:
        """Write the run's logs to ``out``; with ``follow`` keep writing until the run has ended."""

    def stop(self, run: Run) -> str:
        """Ask the run to checkpoint and stop; returns what happened."""


def _backends() -> dict[str, Callable[[argparse.Namespace | None], Backend]]:
    from encdec.launcher.backends.k8s_backend import Kubernetes
    from encdec.launcher.backends.ray_backend import LocalRay, RayCluster, RayJob
    from encdec.launcher.backends.slurm_backend import Slurm

    return {"local": LocalRay, "ray-address": RayCluster, "ray-job": RayJob, "slurm": Slurm, "k8s": Kubernetes}


BACKENDS: Sequence[str] = ("local", "ray-address", "ray-job", "slurm", "k8s")


def backend_for_args(args: argparse.Namespace) -> Backend:
    """The target the ``run`` flags name (``--slurm``, ``--k8s``, ``--submit``, ``--address``, else local)."""
    mode = ("slurm" if getattr(args, "slurm", False) else "k8s" if getattr(args, "k8s", False) else
            "ray-job" if getattr(args, "submit", False) else "ray-address" if getattr(args, "address", None) else
            "local")
    return _backends()[mode](args)


def backend_for_run(run: Run) -> Backend:
    """The target a launched run went to (its ``launch.json`` ``mode``; a Slurm record wins for old runs)."""
    mode = run.launch.get("mode") or "local"
    if run.run_dir is not None and (run.run_dir / "slurm" / "job.json").is_file():
        mode = "slurm"
    factory = _backends().get(mode)
    if factory is None:
        raise LaunchError(f"launch.json mode={mode!r} is not a launch target; allowed: {', '.join(BACKENDS)}")
    return factory(None)
