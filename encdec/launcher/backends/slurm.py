"""Slurm: render ``slurm/ray.sbatch`` from a recipe, submit it, and follow, read and stop the job.

The sbatch template is a plain, working sbatch script with two marked blocks (``sbatch`` and ``settings``);
rendering replaces only those, so what runs on the cluster is the file a reader sees in ``slurm/``. Values come
from the recipe's ``cluster`` and ``cluster.slurm`` sections, overridden by command-line flags. Every value is
checked before anything is written, and all problems are reported at once (``slurm_options``).

A submitted run records its Slurm job id in ``RUN_DIR/slurm/job.json``; :func:`status`, :func:`logs` and
:func:`stop` read it. The squeue/scontrol/scancel commands run underneath; ``scontrol show job`` rather than
``sacct``, which many clusters (and the local test cluster) run without.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from encdec.launcher.backends.slurm_options import (
    FLAG_NAMES,
    SlurmConfigError,
    SlurmOptions,
    parse_time_limit,
    resolve_options,
)
from encdec.launcher.recipe.errors import LaunchError
from encdec.launcher.recipe.schema import recipe_dict

__all__ = [
    "FLAG_NAMES", "SlurmConfigError", "SlurmError", "SlurmJob", "SlurmOptions", "SlurmStatus", "driver_command",
    "follow_logs", "is_slurm_run", "log_paths", "logs", "parse_time_limit", "read_record", "render_sbatch",
    "resolve_options", "status", "stop", "submit", "template_path",
]

RECORD = Path("slurm") / "job.json"
TEMPLATE_ENV = "ENCDEC_SBATCH_TEMPLATE"


class SlurmError(LaunchError):
    """A Slurm command failed or is not available here."""


@dataclass
class SlurmJob:
    """A submitted job: its id, the script that was submitted and the run directory."""

    job_id: str
    script: Path
    run_dir: Path
    submitted_at: float = field(default_factory=time.time)


@dataclass
class SlurmStatus:
    """What Slurm says about a run's job (``state`` is Slurm's JobState, e.g. RUNNING, PENDING, COMPLETED)."""

    job_id: str
    state: str
    reason: str = ""
    restarts: int = 0
    nodes: str = ""
    exit_code: str = ""
    run_time: str = ""

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """One line for ``encdec-launch status``."""
        text = f"Slurm job {self.job_id}: {self.state}"
        if self.reason and self.reason != "None":
            text += f" ({self.reason})"
        if self.nodes:
            text += f" on {self.nodes}"
        if self.run_time:
            text += f", run time {self.run_time}"
        if self.restarts:
            text += f", restarted {self.restarts}x"
        if self.finished and self.exit_code:
            text += f", exit code {self.exit_code}"
        return text

    @property
    def finished(self) -> bool:
        """True once the job has ended for good (a requeued job is not finished)."""
        return self.state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                              "BOOT_FAIL", "DEADLINE", "PREEMPTED", "UNKNOWN"}


# ----------------------------------------------------------------------------------------------------------
# rendering


def template_path() -> Path:
    """``slurm/ray.sbatch`` of this checkout (or ``$ENCDEC_SBATCH_TEMPLATE``).

    Raises:
        SlurmError: when the template cannot be found.
    """
    env = os.environ.get(TEMPLATE_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "slurm" / "ray.sbatch"
    if not path.is_file():
        raise SlurmError(f"sbatch template {path} not found; fix: run from a checkout of encdec-launch "
                         f"(pip install -e .) or set {TEMPLATE_ENV} to a copy of slurm/ray.sbatch")
    return path


def _block_span(text: str, name: str) -> tuple[int, int]:
    start = re.search(rf"^# >>> {name}\b.*$", text, flags=re.M)
    end = re.search(rf"^# <<< {name}$", text, flags=re.M)
    if not start or not end or end.start() < start.end():
        raise SlurmError(f"sbatch template lacks the '# >>> {name}' ... '# <<< {name}' block")
    return start.end() + 1, end.start()


def _block(text: str, name: str) -> list[str]:
    a, b = _block_span(text, name)
    return text[a:b].splitlines()


def _replace_block(text: str, name: str, lines: Sequence[str]) -> str:
    a, b = _block_span(text, name)
    return text[:a] + "".join(line + "\n" for line in lines) + text[b:]


def driver_command(recipe_path: str | Path, run_dir: str | Path) -> list[str]:
    """The driver the job runs on the head node (the job appends ``--address HEAD:PORT``)."""
    # --run-dir: exactly this directory, continued from its last checkpoint when it has one (the requeued job);
    # --no-progress: plain log lines, the job's output is a file
    return ["encdec-launch", str(recipe_path), "--run-dir", str(run_dir), "--no-progress"]


def render_sbatch(
    recipe: Any,
    *,
    recipe_path: str | Path,
    flags: Any = None,
    run_dir: str | Path | None = None,
    driver: Sequence[str] | None = None,
    template: str | Path | None = None,
) -> str:
    """The sbatch script that runs ``recipe`` on a Ray cluster across the job's nodes.

    Args:
        recipe: the recipe (a mapping or the pydantic Recipe); its ``cluster`` sections give the ``#SBATCH`` lines.
        recipe_path: the recipe file the job reads (on storage every node can reach).
        flags: command-line overrides (see :func:`resolve_options`).
        run_dir: the run directory; logs go to ``RUN_DIR/slurm``. Default: ``<cluster.storage>/<run.name>``.
        driver: the command the job runs once Ray is up (default :func:`driver_command`).
        template: another template with the same marked blocks (default :func:`template_path`).

    Raises:
        SlurmConfigError: bad settings (all reported together).
    """
    rec = recipe_dict(recipe)
    opts = resolve_options(rec, flags)
    if run_dir is None:
        storage = (rec.get("cluster") or {}).get("storage") or "runs"
        run_dir = Path(storage) / str((rec.get("run") or {}).get("name") or "run")
    run_dir = Path(run_dir)
    text = Path(template or template_path()).read_text()

    sb = [f"--job-name={opts.job_name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1"]
    sb += [f"--{name}={value}" for name, value in (
        ("partition", opts.partition), ("account", opts.account), ("time", opts.time), ("qos", opts.qos),
        ("constraint", opts.constraint), ("cpus-per-task", opts.cpus_per_task), ("gpus-per-node", opts.gpus_per_node),
    ) if value is not None]
    sb += [f"--output={run_dir / 'slurm' / 'slurm-%j.out'}", "--open-mode=append",
           "--requeue" if opts.requeue else "--no-requeue",
           f"--signal=B:USR1@{opts.signal_grace_s}", *opts.extra]
    text = _replace_block(text, "sbatch", [f"#SBATCH {line}" for line in sb])

    q = shlex.quote
    argv = list(driver) if driver is not None else driver_command(recipe_path, run_dir)
    values: dict[str, str | None] = {
        "RUN_DIR": q(str(run_dir)),
        "RECIPE": q(str(recipe_path)),
        "VENV": q(opts.venv or ""),
        "GRACE_S": str(opts.signal_grace_s),
        "REQUEUE": "1" if opts.requeue else "0",
        "DRIVER": "(" + " ".join(q(a) for a in argv) + ")",
        # Ray knobs: rendered when set; otherwise the template's line stays (its ENCDEC_* default applies)
        "JOIN_TIMEOUT_S": None if opts.join_timeout_s is None else str(opts.join_timeout_s),
        "RAY_NUM_CPUS": None if opts.ray_num_cpus is None else f"{opts.ray_num_cpus:g}",
        "RAY_OBJECT_STORE_MB": None if opts.ray_object_store_mb is None else str(opts.ray_object_store_mb),
        "RAY_DASHBOARD": None if opts.dashboard is None else str(int(opts.dashboard)),
    }
    settings = []
    for line in _block(text, "settings"):
        name = line.split("=", 1)[0]
        if "=" in line and values.get(name) is not None:
            line = f"{name}={values.pop(name)}"
        values.pop(name, None)
        settings.append(line)
    missing = [k for k, v in values.items() if v is not None]
    if missing:
        raise SlurmError(f"sbatch template's settings block lacks {', '.join(missing)}")
    return _replace_block(text, "settings", settings)


# ----------------------------------------------------------------------------------------------------------
# submitting and following


def _run(argv: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]} not found: Slurm commands are needed for this; run it on a login node "
                         "(`--slurm --dry-run` writes the script without them)")
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"{' '.join(argv)} did not answer within {timeout:.0f} s (is slurmctld up?)") from e


def submit(
    recipe: Any,
    *,
    recipe_path: str | Path | None = None,
    flags: Any = None,
    run_dir: str | Path,
    driver: Sequence[str] | None = None,
    sbatch_args: Sequence[str] = (),
) -> SlurmJob:
    """Render the script into ``RUN_DIR/slurm/job.sbatch``, submit it with ``sbatch`` and record the job id.

    Args:
        recipe: the resolved recipe.
        recipe_path: the recipe file the job reads; default: ``RUN_DIR/recipe.yaml``, written here from ``recipe``
            when it does not exist yet (the job must not see later edits of the source file).
        flags: command-line overrides (see :func:`resolve_options`).
        run_dir: the run directory, on storage every node can reach.
        driver: the command the job runs once Ray is up (default :func:`driver_command`).
        sbatch_args: extra ``sbatch`` command-line arguments (they override the script's ``#SBATCH`` lines).

    Raises:
        SlurmConfigError: bad settings. SlurmError: sbatch missing or refusing the job.
    """
    rec = recipe_dict(recipe)
    run_dir = Path(run_dir).resolve()
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)   # sbatch needs the --output directory to exist
    if recipe_path is None:
        recipe_path = run_dir / "recipe.yaml"
        if not recipe_path.exists():
            import yaml

            recipe_path.write_text(yaml.safe_dump(rec, sort_keys=False))
    script = run_dir / "slurm" / "job.sbatch"
    script.write_text(render_sbatch(rec, recipe_path=Path(recipe_path).resolve(), flags=flags, run_dir=run_dir,
                                    driver=driver))
    script.chmod(0o755)
    proc = _run(["sbatch", "--parsable", *sbatch_args, str(script)])
    if proc.returncode != 0:
        said = "; ".join(line.strip() for line in (proc.stderr.strip() or proc.stdout.strip()).splitlines())
        raise SlurmError(f"sbatch refused {script}: {said}")
    job_id = proc.stdout.strip().split(";")[0]
    job = SlurmJob(job_id=job_id, script=script, run_dir=run_dir)
    record = {"launcher": "slurm", **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(job).items()}}
    (run_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return job


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """The ``RUN_DIR/slurm/job.json`` written by :func:`submit`.

    Raises:
        SlurmError: when ``run_dir`` was not launched with ``--slurm``.
    """
    path = Path(run_dir) / RECORD
    if not path.is_file():
        raise SlurmError(f"{run_dir} was not launched on Slurm (no {RECORD}); fix: give a run directory made by "
                         "`encdec-launch RECIPE --slurm`")
    return json.loads(path.read_text())


def is_slurm_run(run_dir: str | Path) -> bool:
    """True when ``run_dir`` was submitted to Slurm."""
    return (Path(run_dir) / RECORD).is_file()


def _parse_scontrol(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", line))


def status(run_dir: str | Path) -> SlurmStatus:
    """The job's state from ``scontrol show job`` (``sacct`` when slurmctld has already forgotten the job)."""
    job_id = str(read_record(run_dir)["job_id"])
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode == 0 and proc.stdout.strip():
        info = _parse_scontrol(proc.stdout)
        return SlurmStatus(
            job_id=job_id, state=info.get("JobState", "UNKNOWN"), reason=info.get("Reason", ""),
            restarts=int(info.get("Restarts", "0") or 0), nodes=info.get("NodeList", ""),
            exit_code=info.get("ExitCode", ""), run_time=info.get("RunTime", ""),
        )
    if shutil.which("sacct"):
        acct = _run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode,NodeList,Elapsed"])
        fields = acct.stdout.strip().splitlines()[-1].split("|") if acct.stdout.strip() else []
        if acct.returncode == 0 and len(fields) == 4:
            return SlurmStatus(job_id=job_id, state=fields[0].split()[0], exit_code=fields[1], nodes=fields[2],
                               run_time=fields[3])
    return SlurmStatus(job_id=job_id, state="UNKNOWN", reason="no longer known to slurmctld, and no accounting")


def log_paths(run_dir: str | Path) -> list[Path]:
    """This run's Slurm logs: the batch script's (driver included) first, then each Ray node's."""
    slurm_dir = Path(run_dir) / "slurm"
    return sorted(slurm_dir.glob("slurm-*.out")) + sorted(slurm_dir.glob("ray-*.log"))


def logs(run_dir: str | Path, *, tail: int | None = None, ray: bool = False) -> str:
    """The job's output (the batch script and the driver; with ``ray=True`` also every Ray node's log).

    Args:
        run_dir: the run directory.
        tail: only the last ``tail`` lines of each file.
        ray: include the Ray nodes' logs.
    """
    read_record(run_dir)
    parts = []
    for path in log_paths(run_dir):
        if path.name.startswith("ray-") and not ray:
            continue
        lines = path.read_text(errors="replace").splitlines()
        parts.append(f"==> {path} <==\n" + "\n".join(lines[-tail:] if tail else lines))
    return "\n".join(parts) if parts else f"(no logs yet in {Path(run_dir) / 'slurm'}; the job may be pending)"


def follow_logs(run_dir: str | Path, *, poll_s: float = 1.0) -> Iterator[str]:
    """Lines of the job's output as they are written, until the job has ended (``encdec-launch logs --follow``).

    A requeued job keeps appending to the same file (``--open-mode=append``), so this follows every restart.
    """
    job_id = str(read_record(run_dir)["job_id"])
    path = Path(run_dir) / "slurm" / f"slurm-{job_id}.out"
    offset, partial = 0, ""
    while True:
        finished = status(run_dir).finished   # read before the file, so the last lines are not missed
        if path.exists():
            with path.open(errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            lines = (partial + chunk).split("\n")
            partial = lines.pop()
            yield from lines
        if finished:
            if partial:
                yield partial
            return
        time.sleep(poll_s)


def stop(run_dir: str | Path, *, graceful: bool = True, timeout_s: float = 300) -> SlurmStatus:
    """Stop a Slurm run: by default checkpoint first (as on preemption, without the requeue), then end.

    Args:
        run_dir: the run directory.
        graceful: send USR1 to the batch script, which makes the driver checkpoint and return; False cancels at
            once (``scancel``; the last committed checkpoint stays).
        timeout_s: how long a graceful stop may take before the job is cancelled.
    """
    job_id = str(read_record(run_dir)["job_id"])
    current = status(run_dir)
    if current.finished:
        return current
    if graceful and current.state == "RUNNING":
        (Path(run_dir) / "slurm" / f"stop-{job_id}").touch()   # tells the script: no requeue after this USR1
        proc = _run(["scancel", "--batch", "--signal=USR1", job_id])
        if proc.returncode == 0:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                current = status(run_dir)
                if current.finished:
                    return current
                time.sleep(1.0)
    proc = _run(["scancel", job_id])
    if proc.returncode != 0:
        raise SlurmError(f"scancel {job_id} failed: {proc.stderr.strip()}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = status(run_dir)
        if current.finished:
            break
        time.sleep(0.5)
    return current
