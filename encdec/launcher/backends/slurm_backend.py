"""Slurm (``--slurm``): the entry's command is the driver of a batch job that starts one Ray cluster on its nodes.

Rendering, submitting and job control are ``encdec.launcher.backends.slurm``; this adapts them to ``Backend``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from encdec.launcher.backends.base import Entry, Run
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["Slurm"]


def _driver(entry: Entry, run_dir: Path) -> list[str]:
    argv = entry.argv(run_dir, str(run_dir / "recipe.yaml"))
    if entry.needs_ray_address:
        return argv   # the batch script appends --address HEAD:PORT
    # a command that joins no Ray cluster: the appended --address lands in bash's unused positional arguments
    return ["bash", "-c", shlex.join(argv), "encdec-job"]


_LAUNCH_FILES = {"recipe.yaml", "launch.json", "versions.json", "slurm"}


def _discard_unsubmitted(run_dir: Path) -> bool:
    """Remove a run directory this launch just made (only its own files; never a resumed run's)."""
    from encdec.launcher.rundir import read_launch

    names = {p.name for p in run_dir.iterdir()}
    own_slurm = not (run_dir / "slurm").exists() or {p.name for p in (run_dir / "slurm").iterdir()} <= {"job.sbatch"}
    if names - _LAUNCH_FILES or not own_slurm or "resumed" in read_launch(run_dir):
        return False
    shutil.rmtree(run_dir)
    return True


class Slurm:
    """A Slurm batch job (``sbatch``), one Ray node per Slurm node."""

    mode = "slurm"
    runs_here = False
    writes_synthetic_here = False
    strict_data = False   # the nodes read the data, not this machine

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.args = args

    def where(self) -> str:
        return "Slurm"

    def _flags(self) -> dict[str, Any]:
        return vars(self.args) if self.args is not None else {}

    def preview(self, entry: Entry, run_dir: Path) -> str:
        from encdec.launcher.backends import slurm

        try:
            return slurm.render_sbatch(entry.recipe.to_yaml_dict(), recipe_path=str(run_dir / "recipe.yaml"),
                                       flags=self._flags(), run_dir=run_dir, driver=_driver(entry, run_dir))
        except slurm.SlurmConfigError as err:
            raise LaunchError(" ".join(str(err).split())) from None

    def submit(self, entry: Entry, make_run_dir: Callable[[], Path], console: Any) -> int:
        from encdec.launcher.backends import slurm
        from encdec.launcher.rundir import update_launch

        run_dir = make_run_dir()
        try:
            job = slurm.submit(entry.recipe.to_yaml_dict(), recipe_path=str(run_dir / "recipe.yaml"),
                               flags=self._flags(), run_dir=run_dir, driver=_driver(entry, run_dir))
        except (slurm.SlurmError, slurm.SlurmConfigError) as err:
            # nothing was queued: a new run directory holding only the launch's own files would be an orphan
            what = "removed" if _discard_unsubmitted(run_dir) else "kept (it holds an earlier run)"
            msg = " ".join(str(err).split()).replace(str(run_dir / "slurm" / "job.sbatch"), "the job")
            raise LaunchError(f"{msg}; nothing was submitted, the run directory {run_dir} was {what}; "
                              "see the script with --dry-run --slurm") from None
        update_launch(run_dir, mode=self.mode, slurm_job_id=job.job_id)
        console.print(f"submitted Slurm job {job.job_id}; follow it with `encdec-launch status|logs|stop {run_dir}`")
        return 0

    @staticmethod
    def _dir(run: Run) -> Path:
        if run.run_dir is None:
            raise LaunchError("a Slurm run is followed through its run directory; give RUN_DIR, not a job id")
        return run.run_dir

    def status(self, run: Run) -> str:
        from encdec.launcher.backends import slurm

        return str(slurm.status(self._dir(run)))

    def logs(self, run: Run, *, tail: int | None, follow: bool, out: IO[str]) -> None:
        from encdec.launcher.backends import slurm

        if not follow:
            out.write(slurm.logs(self._dir(run), tail=tail) + "\n")
            return
        for line in slurm.follow_logs(self._dir(run)):
            out.write(line + "\n")
            out.flush()

    def stop(self, run: Run) -> str:
        from encdec.launcher.backends import slurm

        return str(slurm.stop(self._dir(run)))
