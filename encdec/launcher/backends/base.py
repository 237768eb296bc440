"""The one ``Backend`` protocol every launch target implements, and the one place that picks a target.

A target is where a command runs: the embedded local Ray cluster, an existing Ray cluster (``--address``), a Ray
Job (``--submit``), Slurm (``--slurm``) or Kubernetes (``--k8s``). The command is an :class:`Entry` (training;
predict, evaluate, tune: any ``encdec-launch`` subcommand through :func:`command_entry`), so a new command reaches
every target through one ``Backend.submit`` call (:func:`submit_to_target`).
``status|logs|stop`` read the run's ``launch.json`` ``mode`` and call the same backend: no if-chains on modes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from encdec.launcher.recipe.errors import LaunchError

__all__ = ["BACKENDS", "Backend", "Entry", "Run", "backend_for_args", "backend_for_run", "command_entry",
           "submit_to_target"]


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
    plan: Any = None   # the recipe's plan (``preflight.plan.Plan``) when there is one: it sizes Kubernetes pods


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
    runs_here: bool        # the entry runs in this process (``Entry.run_here``), not as a job elsewhere

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


def command_entry(command: str, args: argparse.Namespace, recipe: Any, run_here: Callable[[], int], *,
                  path_dests: Sequence[str] = (), drop: Sequence[str] = (), needs_ray_address: bool = True) -> Entry:
    """Any ``encdec-launch`` subcommand as a launch entry: on a target it runs ``encdec-launch COMMAND`` with the
    flags of ``args`` (rebuilt from the command's parser, less the target flags); here it calls ``run_here()``.

    Args:
        command: the subcommand (``predict``, ``evaluate``, ``tune``...).
        args: its parsed flags.
        recipe: the recipe whose ``cluster`` section sizes the job (nodes, Slurm settings, pod resources); it is
            the job directory's ``recipe.yaml``.
        run_here: the command in this process (local Ray, ``--address``).
        path_dests: dests holding local paths, made absolute for the target.
        drop: dests that mean nothing on the target (e.g. ``simulate_nodes``), beside the target flags.
        needs_ray_address: the command joins the target's Ray cluster (it takes ``--address``).
    """
    from encdec.launcher.backends.flags import command_argv

    def argv(run_dir: Path, recipe_path: str) -> list[str]:
        return command_argv(command, args, path_dests=path_dests, drop=drop)

    return Entry(name=command, recipe=recipe, argv=argv, run_here=lambda make_run_dir, a, console: run_here(),
                 needs_ray_address=needs_ray_address)


def submit_to_target(entry: Entry, args: argparse.Namespace, console: Any, *, job_dir: Path,
                     dry_run: bool = False, out: IO[str] | None = None) -> int:
    """Run ``entry`` on the target ``args`` name; a job elsewhere lives in ``job_dir`` (its ``recipe.yaml``,
    ``launch.json``, the Slurm script and logs, the RayJob manifest), so ``status|logs|stop JOB_DIR`` follow it.

    With ``dry_run``, a target that has a preview (the sbatch script, the RayJob manifest) writes it to ``out``
    (stdout) alone and returns; the local targets run the entry, which does its own dry run.

    Raises:
        LaunchError: ``job_dir`` already belongs to another command's run (its recipe would be overwritten).
    """
    import sys

    backend = backend_for_args(args)
    if entry.recipe is None and not backend.runs_here:
        raise LaunchError(f"{entry.name} on {backend.where()} needs a recipe: its cluster section sizes the job. "
                          "Fix: give a run directory, or an export folder beside its run's recipe.yaml.")
    if dry_run:
        text = backend.preview(entry, job_dir)
        if text is not None:
            (out or sys.stdout).write(text if text.endswith("\n") else text + "\n")
            return 0

    def make_run_dir() -> Path:
        from encdec.launcher.rundir import LAUNCH_FILE, is_run_dir, read_launch, write_run_files

        launched = read_launch(job_dir) if is_run_dir(job_dir) else {}
        if launched and launched.get("command", "train") != entry.name:   # a training run has no "command"
            raise LaunchError(f"{job_dir} is the directory of another run ({LAUNCH_FILE} command "
                              f"{launched.get('command', 'train')!r}); its recipe would be overwritten. "
                              f"Fix: give {entry.name} an output folder of its own.")
        job_dir.mkdir(parents=True, exist_ok=True)
        write_run_files(job_dir, entry.recipe.to_yaml_dict(), {"mode": backend.mode, "command": entry.name})
        console.print(f"job directory: {job_dir} (follow it: encdec-launch status|logs|stop {job_dir})")
        return job_dir

    return backend.submit(entry, make_run_dir, console)
