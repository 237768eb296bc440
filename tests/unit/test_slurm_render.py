"""The sbatch script rendered from recipes and flags: golden files, the template's shape, and every bad value.

Golden files (tests/unit/golden/slurm_*.sbatch) were reviewed by eye; after an intended change of the template,
regenerate them with ``ENCDEC_UPDATE_GOLDEN=1 pytest tests/unit/test_slurm_render.py`` and review the diff.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from encdec.launcher.backends import slurm
from encdec.launcher.backends.slurm import SlurmConfigError, parse_time_limit, render_sbatch, resolve_options

GOLDEN = Path(__file__).parent / "golden"
TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "ray.sbatch"
RUN_DIR = "/shared/runs/floods-20260101-120000"


def _recipe(**cluster: Any) -> dict[str, Any]:
    return {
        "task": "segmentation",
        "run": {"name": "floods", "seed": 0},
        "cluster": {"nodes": 2, "workers_per_node": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0,
                    "storage": "/shared/runs", **cluster},
    }


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # the quickstart shape on two CPU nodes, recipe defaults only
    "cpu2": (_recipe(slurm={"time": "01:00:00"}), {}),
    # prithvi_lora.yaml's shape: 8 GPU nodes x 8 workers, every cluster.slurm field set
    "gpu8": (
        _recipe(nodes=8, workers_per_node=8, cpus_per_worker=8, gpus_per_worker=1, slurm={
            "partition": "gpu", "account": "geo-ml", "time": "1-00:00:00", "qos": "high",
            "constraint": "a100&ib", "signal_grace_s": 300, "extra": ["--mem=0", "#SBATCH --exclusive"],
        }),
        {},
    ),
    # the command line wins over the recipe; no requeue; Ray knobs for a small shared host
    "flags": (
        _recipe(slurm={"partition": "gpu", "time": "24:00:00", "requeue": False, "extra": ["--mem=0"]}),
        {"nodes": 4, "partition": "debug", "account": "me", "time": "90", "qos": "short", "constraint": "cpu",
         "gpus_per_node": 2, "cpus_per_task": 16, "signal_grace_s": 60, "extra": ["--exclusive"],
         "job_name": "try it", "join_timeout_s": 120, "ray_num_cpus": 2, "ray_object_store_mb": 300,
         "dashboard": False, "partition_unrelated": "ignored"},
    ),
}


def _render(name: str) -> str:
    recipe, flags = CASES[name]
    return render_sbatch(recipe, recipe_path=f"{RUN_DIR}/recipe.yaml", run_dir=RUN_DIR,
                         flags={"venv": "/shared/venvs/encdec", **flags})


def _sbatch_lines(text: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_golden(name: str) -> None:
    text = _render(name)
    path = GOLDEN / f"slurm_{name}.sbatch"
    if os.environ.get("ENCDEC_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"rendered script differs from {path}; see the module docstring to update"


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_shape(name: str) -> None:
    text = _render(name)
    # bash parses it; every #SBATCH line precedes the first command (sbatch stops reading at the first one)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    sb = _sbatch_lines(text)
    assert sum(line.startswith("--nodes=") for line in sb) == 1
    assert f"--output={RUN_DIR}/slurm/slurm-%j.out" in sb and "--open-mode=append" in sb
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", line) for line in sb)
    # outside the two marked blocks, the rendered script IS the template
    strip = re.compile(r"^# >>> (sbatch|settings)\b.*?^# <<< \1$", re.S | re.M)
    assert strip.sub("", text) == strip.sub("", TEMPLATE.read_text())


def test_values_reach_the_script() -> None:
    sb = _sbatch_lines(_render("gpu8"))
    for line in ("--nodes=8", "--ntasks-per-node=1", "--partition=gpu", "--account=geo-ml", "--time=1-00:00:00",
                 "--qos=high", "--constraint=a100&ib", "--cpus-per-task=64", "--gpus-per-node=8", "--requeue",
                 "--signal=B:USR1@300", "--mem=0", "--exclusive", "--job-name=encdec-floods"):
        assert line in sb
    flags = _render("flags")
    sb = _sbatch_lines(flags)
    for line in ("--nodes=4", "--partition=debug", "--account=me", "--time=90", "--qos=short", "--constraint=cpu",
                 "--gpus-per-node=2", "--cpus-per-task=16", "--signal=B:USR1@60", "--no-requeue", "--mem=0",
                 "--exclusive", "--job-name=try-it"):
        assert line in sb
    assert "--partition=gpu" not in sb and "--requeue" not in sb
    for setting in ("RAY_NUM_CPUS=2", "RAY_OBJECT_STORE_MB=300", "RAY_DASHBOARD=0", "JOIN_TIMEOUT_S=120",
                    "GRACE_S=60", "REQUEUE=0", "VENV=/shared/venvs/encdec"):
        assert re.search(rf"^{re.escape(setting)}$", flags, re.M), setting


def test_quoting_of_paths_with_spaces(tmp_path: Path) -> None:
    run_dir = tmp_path / "my runs" / "a'b"
    text = render_sbatch(_recipe(), recipe_path=run_dir / "recipe.yaml", run_dir=run_dir, flags={"venv": "/v"})
    script = text.split("# >>> settings", 1)[1].split("# <<< settings", 1)[0].split("\n", 1)[1]
    out = subprocess.run(["bash", "-c", script + '\nprintf "%s\\n" "$RUN_DIR" "${DRIVER[@]}"'],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == str(run_dir)
    assert out[1:] == slurm.driver_command(run_dir / "recipe.yaml", run_dir)


def test_accepts_a_pydantic_style_model() -> None:
    class Model:
        def model_dump(self) -> dict[str, Any]:
            return CASES["gpu8"][0]

    assert render_sbatch(Model(), recipe_path=f"{RUN_DIR}/recipe.yaml", run_dir=RUN_DIR,
                         flags={"venv": "/shared/venvs/encdec"}) == _render("gpu8")
    with pytest.raises(TypeError, match="mapping or a pydantic Recipe"):
        render_sbatch(["not", "a", "recipe"], recipe_path="r.yaml", run_dir=RUN_DIR)


def test_template_is_a_plain_sbatch_script() -> None:
    text = TEMPLATE.read_text()
    subprocess.run(["bash", "-n", str(TEMPLATE)], check=True)
    assert text.startswith("#!/bin/bash\n")
    assert {"--nodes=2", "--ntasks-per-node=1", "--requeue", "--signal=B:USR1@120"} <= set(_sbatch_lines(text))
    # without rendering it takes its settings from the environment, and says which one is missing
    assert "${ENCDEC_RUN_DIR:?" in text
    # never a machine-wide `ray stop` (it would kill other jobs' Ray): only comments may mention it
    assert not [line for line in text.splitlines()
                if re.search(r"\bray\s+stop\b", line) and not line.lstrip().startswith("#")]


# CI installs shellcheck (.ci/run), so there a missing one fails rather than skips
@pytest.mark.skipif(shutil.which("shellcheck") is None and os.environ.get("CI") != "true",
                    reason="shellcheck is not installed")
def test_shellcheck_clean() -> None:
    assert shutil.which("shellcheck"), "shellcheck is not installed: .ci/run installs it with apt-get"
    proc = subprocess.run(["shellcheck", "-s", "bash", "-S", "warning", "-"], input=_render("gpu8"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    # the scripts users and CI run as they are committed: the sbatch template, the local Slurm cluster, CI itself
    root = Path(__file__).resolve().parents[2]
    scripts = [root / "slurm" / "ray.sbatch", root / "tests" / "cluster" / "local-slurm.sh", root / ".ci" / "run"]
    proc = subprocess.run(["shellcheck", "-s", "bash", "-S", "warning", *map(str, scripts)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _problems(recipe: dict[str, Any], flags: dict[str, Any] | None = None) -> list[str]:
    with pytest.raises(SlurmConfigError) as info:
        resolve_options(recipe, flags)
    return info.value.problems


def test_all_problems_reported_at_once() -> None:
    problems = _problems(
        _recipe(nodes=0, slurm={"time": "tomorrow", "partition": "gpu queue", "signal_grace_s": 5,
                                "extra": ["--nodes=3", "mem=0", "--exclusive\n--mem=0"]}),
        {"cpus_per_task": 0},
    )
    text = "\n".join(problems)
    assert len(problems) == 8, text
    assert "cluster.nodes: must be an int >= 1, got 0 (out of range); fix: write a whole number >= 1" in text
    assert "cluster.slurm.time: 'tomorrow' is not a Slurm time limit" in text and "HH:MM:SS" in text
    assert "cluster.slurm.partition: 'gpu queue'" in text
    assert "cluster.slurm.signal_grace_s: must be an int >= 10 and <= 65535, got 5" in text
    assert "cluster.slurm.extra[0]: --nodes is set by encdec-launch; use cluster.nodes or --nodes instead" in text
    assert "cluster.slurm.extra[1]: 'mem=0' is not one sbatch option" in text
    assert "cluster.slurm.extra[2]" in text
    assert "--cpus-per-task: must be an int >= 1, got 0" in text
    assert str(SlurmConfigError(problems)).startswith("Slurm settings have 8 problems:")


def test_flag_errors_name_the_flag() -> None:
    problems = _problems(_recipe(), {"time": "25:99:99:99", "nodes": 2.5})
    assert any(p.startswith("--time: '25:99:99:99'") for p in problems)
    assert any(p.startswith("--nodes: must be an int >= 1, got 2.5 (a float)") for p in problems)


def test_grace_must_fit_the_time_limit() -> None:
    (problem,) = _problems(_recipe(slurm={"time": "2", "signal_grace_s": 120}))
    assert "cluster.slurm.signal_grace_s: 120 s of warning does not fit in the time limit '2' (120 s)" in problem
    assert resolve_options(_recipe(slurm={"time": "3", "signal_grace_s": 120})).time == "3"


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 5400), ("10:30", 630), ("01:02:03", 3723), ("2-00", 172800), ("1-02:30", 95400),
    ("1-00:00:01", 86401), ("UNLIMITED", None), ("infinite", None),
])
def test_parse_time_limit(text: str, seconds: int | None) -> None:
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "-5", "1-", "a-01"])
def test_parse_time_limit_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time_limit(text)


def test_resources_from_workers() -> None:
    opts = resolve_options(_recipe(workers_per_node=4, cpus_per_worker=0.5, gpus_per_worker=0.5))
    assert (opts.cpus_per_task, opts.gpus_per_node) == (2, 2)
    opts = resolve_options(_recipe(gpus_per_worker=0))
    assert opts.gpus_per_node is None and "--gpus-per-node" not in "\n".join(
        _sbatch_lines(render_sbatch(_recipe(), recipe_path="r.yaml", run_dir=RUN_DIR)))


def test_missing_template_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(slurm.TEMPLATE_ENV, str(tmp_path / "nope.sbatch"))
    with pytest.raises(slurm.SlurmError, match=r"sbatch template .*nope\.sbatch not found"):
        render_sbatch(_recipe(), recipe_path="r.yaml", run_dir=RUN_DIR)
    broken = tmp_path / "broken.sbatch"
    broken.write_text("#!/bin/bash\n# >>> sbatch\n# <<< sbatch\n")
    with pytest.raises(slurm.SlurmError, match="lacks the '# >>> settings'"):
        render_sbatch(_recipe(), recipe_path="r.yaml", run_dir=RUN_DIR, template=broken)


def test_not_a_slurm_run(tmp_path: Path) -> None:
    assert not slurm.is_slurm_run(tmp_path)
    for call in (slurm.status, slurm.logs, slurm.stop):
        with pytest.raises(slurm.SlurmError, match="was not launched on Slurm"):
            call(tmp_path)
