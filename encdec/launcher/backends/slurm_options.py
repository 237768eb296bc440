"""Slurm options: the recipe's ``cluster``/``cluster.slurm`` sections merged with the command-line flags and
checked (all problems at once) into the :class:`SlurmOptions` the sbatch script is rendered from.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encdec.config import ClusterSection, SlurmSection
from encdec.config.checks import int_problem, is_number
from encdec.launcher.recipe.schema import recipe_dict

__all__ = ["FLAG_NAMES", "SlurmConfigError", "SlurmOptions", "current_venv", "parse_time_limit", "resolve_options"]

# command-line flags (argparse dest names) that override the recipe; anything else in `flags` is ignored
FLAG_NAMES = (
    "nodes", "partition", "account", "time", "qos", "constraint", "gpus_per_node", "cpus_per_task",
    "signal_grace_s", "extra", "job_name", "venv", "join_timeout_s", "ray_num_cpus", "ray_object_store_mb",
    "dashboard", "requeue",
)
# sbatch options the script sets itself, or that have their own recipe field or flag
_ONE_RAY_NODE = "nothing (one Ray node per Slurm node)"
_MANAGED = {opt: use for opts, use in {
    ("--nodes", "-N"): "cluster.nodes or --nodes",
    ("--partition", "-p"): "cluster.slurm.partition or --partition",
    ("--account", "-A"): "cluster.slurm.account or --account",
    ("--time", "-t"): "cluster.slurm.time or --time",
    ("--qos", "-q"): "cluster.slurm.qos or --qos",
    ("--constraint", "-C"): "cluster.slurm.constraint or --constraint",
    ("--gpus-per-node",): "cluster.gpus_per_worker or --gpus-per-node",
    ("--cpus-per-task", "-c"): "cluster.cpus_per_worker or --cpus-per-task",
    ("--signal",): "cluster.slurm.signal_grace_s",
    ("--job-name", "-J"): "run.name or --name (the job is named encdec-<run.name>)",
    ("--ntasks-per-node", "--ntasks", "-n"): _ONE_RAY_NODE,
    ("--output", "-o"): "nothing (logs go to RUN_DIR/slurm)",
    ("--open-mode",): "nothing (append keeps every restart's log)",
    ("--requeue", "--no-requeue"): "cluster.slurm.requeue",
}.items() for opt in opts}
_TIME_RE = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%+=/&|!\[\]*()-]+$")


class SlurmConfigError(ValueError):
    """Bad Slurm settings, all of them: each names the field, the value, what is allowed and the fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        n = len(self.problems)
        return f"Slurm settings have {n} problem{'s' if n != 1 else ''}:\n" + "\n".join(
            f"  {i + 1}. {p}" for i, p in enumerate(self.problems)
        )


@dataclass(frozen=True)
class SlurmOptions:
    """Everything the sbatch script is rendered from, after the recipe and the flags are merged and checked."""

    job_name: str
    nodes: int
    signal_grace_s: int
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    extra: tuple[str, ...] = ()
    venv: str | None = None
    join_timeout_s: int | None = None
    ray_num_cpus: float | None = None
    ray_object_store_mb: int | None = None
    dashboard: bool | None = None
    requeue: bool = True


# ----------------------------------------------------------------------------------------------------------
# options


def _flags_dict(flags: Any) -> dict[str, Any]:
    if flags is None:
        return {}
    raw = dict(flags) if isinstance(flags, Mapping) else dict(vars(flags))
    return {k: v for k, v in raw.items() if k in FLAG_NAMES and v is not None}


def parse_time_limit(text: str) -> int | None:
    """Seconds in a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``); None for unlimited.

    Raises:
        ValueError: when ``text`` is none of Slurm's formats.
    """
    text = text.strip()
    if text.upper() in {"INFINITE", "UNLIMITED"}:
        return None
    m = _TIME_RE.match(text)
    if not m:
        raise ValueError(text)
    d, dh, dm, ds, a, b, c = m.groups()
    if d is not None:
        return int(d) * 86400 + int(dh) * 3600 + int(dm or 0) * 60 + int(ds or 0)
    if c is not None:
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


def _int_field(problems: list[str], where: str, value: Any, low: int, high: int | None = None) -> int | None:
    # a recipe dict may hold 2.0 for a count (JSON/YAML writers do), so whole floats pass
    problem = int_problem(value, f"{where}:", minimum=low, maximum=high, whole_floats=True)
    if problem is not None:
        problems.append(problem)
        return None
    return int(value)


def resolve_options(recipe: Any, flags: Any = None) -> SlurmOptions:
    """Merge the recipe's ``cluster`` / ``cluster.slurm`` sections with command-line flags and check them.

    Args:
        recipe: the recipe (a mapping or the pydantic Recipe).
        flags: overrides, a mapping or an argparse namespace; keys in :data:`FLAG_NAMES`, None means unset.

    Raises:
        SlurmConfigError: every problem found, each with its field, value and fix.
    """
    rec = recipe_dict(recipe)
    cluster = dict(rec.get("cluster") or {})
    slurm = dict(cluster.get("slurm") or {})
    fl = _flags_dict(flags)
    problems: list[str] = []

    def pick(name: str, recipe_value: Any, recipe_field: str) -> tuple[Any, str]:
        if name in fl:
            return fl[name], "--" + name.replace("_", "-")
        return recipe_value, recipe_field

    nodes_v, where = pick("nodes", ClusterSection.written_or_default(cluster, "nodes"), "cluster.nodes")
    nodes = _int_field(problems, where, nodes_v, 1)

    strings: dict[str, str | None] = {}
    for name in ("partition", "account", "time", "qos", "constraint"):
        value, where = pick(name, slurm.get(name), f"cluster.slurm.{name}")
        if value is None or value == "":
            strings[name] = None
            continue
        value = str(value)
        if not _SAFE_VALUE.match(value):
            problems.append(f"{where}: {value!r} has characters sbatch would not read as one value "
                            "(spaces, quotes, newlines); fix: give the bare Slurm name")
            value = None
        strings[name] = value

    grace_v, grace_where = pick("signal_grace_s", SlurmSection.written_or_default(slurm, "signal_grace_s"),
                                "cluster.slurm.signal_grace_s")
    grace = _int_field(problems, grace_where, grace_v, 10, 65535)
    if strings["time"] is not None:
        try:
            limit = parse_time_limit(strings["time"])
        except ValueError:
            where = "--time" if "time" in fl else "cluster.slurm.time"
            problems.append(f"{where}: {strings['time']!r} is not a Slurm time limit; allowed: MINUTES, MM:SS, "
                            "HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED (e.g. '24:00:00')")
            limit = None
        if limit is not None and grace is not None and grace >= limit:
            problems.append(f"{grace_where}: {grace} s of warning does not fit in the time limit "
                            f"{strings['time']!r} ({limit} s); fix: a longer time or a smaller signal_grace_s")

    workers = ClusterSection.written_or_default(cluster, "workers_per_node") or 1
    gpus_v, where = pick("gpus_per_node", None, "cluster.gpus_per_worker")
    if gpus_v is None and cluster.get("gpus_per_worker"):
        gpus_v = math.ceil(float(cluster["gpus_per_worker"]) * float(workers))
    gpus = _int_field(problems, where, gpus_v, 0) if gpus_v is not None else None
    cpus_v, where = pick("cpus_per_task", None, "cluster.cpus_per_worker")
    if cpus_v is None and cluster.get("cpus_per_worker"):
        cpus_v = math.ceil(float(cluster["cpus_per_worker"]) * float(workers))
    cpus = _int_field(problems, where, cpus_v, 1) if cpus_v is not None else None

    extra: list[str] = []
    for i, line in enumerate([*(slurm.get("extra") or []), *(fl.get("extra") or [])]):
        where = f"cluster.slurm.extra[{i}]"
        text = str(line).strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH"):].strip()
        option = re.split(r"[=\s]", text, maxsplit=1)[0]
        if not text.startswith("-") or "\n" in text or "\r" in text:
            problems.append(f"{where}: {line!r} is not one sbatch option; allowed: a line such as "
                            "'--mem=0' or '--exclusive' (one option per list item)")
        elif option in _MANAGED:
            problems.append(f"{where}: {option} is set by encdec-launch; use {_MANAGED[option]} instead")
        else:
            extra.append(text)

    job_name = str(fl.get("job_name") or f"encdec-{(rec.get('run') or {}).get('name') or 'run'}")
    job_name = re.sub(r"[^A-Za-z0-9_.-]", "-", job_name)[:64]
    join = fl.get("join_timeout_s")
    join = _int_field(problems, "--join-timeout-s", join, 10) if join is not None else None
    store = fl.get("ray_object_store_mb")
    store = _int_field(problems, "--ray-object-store-mb", store, 80) if store is not None else None
    ray_cpus = fl.get("ray_num_cpus")
    if ray_cpus is not None and (not is_number(ray_cpus) or ray_cpus <= 0):
        problems.append(f"--ray-num-cpus: must be a number > 0, got {ray_cpus!r}; fix: the CPUs Ray may use per node, "
                        "e.g. 8 or 0.5")
    venv = fl.get("venv") or current_venv()

    if problems:
        raise SlurmConfigError(problems)
    return SlurmOptions(
        job_name=job_name, nodes=nodes or 1, signal_grace_s=grace or 120, partition=strings["partition"],
        account=strings["account"], time=strings["time"], qos=strings["qos"], constraint=strings["constraint"],
        gpus_per_node=gpus or None, cpus_per_task=cpus, extra=tuple(extra), venv=str(venv) if venv else None,
        join_timeout_s=join, ray_num_cpus=ray_cpus, ray_object_store_mb=store,
        dashboard=None if fl.get("dashboard") is None else bool(fl["dashboard"]),
        requeue=bool(fl.get("requeue", slurm.get("requeue", True))),
    )


def current_venv() -> str | None:
    """This interpreter's virtualenv when it has ``ray`` (the job then runs the same installation)."""
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "ray").exists():
        return sys.prefix
    return None
