"""Why a run ended (``status.json``), what ``status`` and ``logs`` show, and quiet output (issue 17).

The driver's own path runs here without Ray: ``finish_run`` on a run directory with the metrics a run leaves;
the same through a real run on the shared Ray cluster: best.yaml's training run in
tests/integration/test_tune.py (``_short_run_records_its_end_and_logs_quietly``).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "encdec.launcher.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)


def _run_dir(tmp_path: Path, **launch: object) -> Path:
    from encdec.launcher.rundir import write_run_files

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    write_run_files(run_dir, recipe, {"mode": "local", **launch})
    return run_dir


def test_status_json_is_written_atomically_and_keeps_the_start(tmp_path: Path) -> None:
    from encdec.launcher.rundir import read_status, write_status

    first = write_status(tmp_path, "running", "2 workers")
    time.sleep(1.1)
    last = write_status(tmp_path, "finished", "8 steps", step=8)
    assert read_status(tmp_path) == last and last["started"] == first["started"] != last["ended"]
    assert last["state"] == "finished" and last["step"] == 8 and "ended" not in first
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="not one of"):
        write_status(tmp_path, "done")


def test_end_of_run_names_the_first_error_the_skipped_tiles_and_the_early_stop() -> None:
    from encdec.config.early_stop import EarlyStopConfig
    from encdec.data.badtiles import TooManyBadTilesError
    from encdec.launcher.report import end_of_run

    rows = [{"step": 2, "train/loss": 0.5}, {"step": 4, "val/loss": 0.4}]
    skips = {"empty": 19, "unreadable": 1}

    class WorkerGroupError(RuntimeError):  # Ray Train's shape: the failing ranks' own exceptions
        def __init__(self, failures: dict[int, BaseException]) -> None:
            super().__init__("Training failed due to worker errors:\n[Rank 1]\nTraceback ...")
            self.worker_failures = failures

    try:
        try:
            raise TooManyBadTilesError("21 of 132 tiles bad (16%) > data.max_bad_fraction=0.01")
        except TooManyBadTilesError as e:
            raise RuntimeError("rank 1 met a data error") from e  # as StopOnDataError wraps it
    except RuntimeError as e:
        data_error = e
    state, reason, details = end_of_run(failed=WorkerGroupError({3: ValueError("later"), 1: data_error}),
                                        stopped=False, rows=rows, max_steps=8, skips=skips)
    assert state == "failed"
    assert reason.startswith("TooManyBadTilesError: 21 of 132 tiles bad") and "(at step 4)" in reason
    assert "skipped 20 tiles (empty 19, unreadable 1" in reason and details["skipped_tiles"] == skips
    assert "WorkerGroupError" in details["error"]  # the full text is kept beside the one line

    early = [*rows, {"step": 6, "val/loss": 0.41, "status": "early-stopped"}]
    state, reason, details = end_of_run(failed=None, stopped=False, rows=early, max_steps=40, skips={},
                                        early_stop=EarlyStopConfig(metric="val/loss", patience=2))
    assert state == "early-stopped" and "val/loss = 0.41" in reason and "at step 6" in reason
    assert details["early_stop"] == {"metric": "val/loss", "step": 6, "value": 0.41, "patience": 2}
    assert end_of_run(failed=None, stopped=True, rows=rows, max_steps=8, skips={})[0] == "stopped"
    assert end_of_run(failed=None, stopped=False, rows=rows, max_steps=4, skips={})[:2] == ("finished", "4 steps")


def test_finish_run_records_the_end_and_prints_a_plain_summary_within_100_columns(tmp_path: Path) -> None:
    from rich.console import Console

    from encdec.launcher.ray.driver import FitOutcome
    from encdec.launcher.ray.local_run import finish_run
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.launcher.report import RunLog

    run_dir = _run_dir(tmp_path)
    recipe = load_recipe(run_dir / "recipe.yaml", ["run.export=false", "train.max_steps=4"])
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in (2, 4):
            f.write(json.dumps({"step": step, "train/loss": 0.7 / step, "train/tiles_per_s": 40.0}) + "\n")
    (run_dir / "skipped_tiles.csv").write_text("file,reason,detail,rank,step\n/deep/" + "d" * 150
                                              + "/a_img.tif,empty,all nodata,0,1\n")
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False)  # as the CLI makes it for a log file
    log = RunLog(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no matplotlib warning (a run without validation has one labelled line)
        assert finish_run(recipe, run_dir, FitOutcome(seconds=3.0), console, runlog=log) == 0
    log.close()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["reason"].startswith("4 steps; skipped 1 tiles (empty 1")
    text = out.getvalue()
    table = text[text.index("summary"):text.index("skipped tiles, first")].splitlines()
    assert len(table) > 10 and max(len(line) for line in table) <= 100, "\n".join(table)
    assert "\x1b[" not in text
    driver = (run_dir / "logs" / "driver.log").read_text()
    assert "driver INFO finished: 4 steps" in driver and "summary: steps: 4 / 4" in driver and "\x1b[" not in driver


def test_plot_without_loss_reports_gives_no_legend_warning(tmp_path: Path) -> None:
    from encdec.launcher.report import plot_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_metrics([{"step": 2, "checkpoint": "x"}], tmp_path / "m.png") is not None


def test_console_for_a_log_has_no_colour_even_when_forced(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from encdec.launcher.report import make_console

    monkeypatch.setenv("FORCE_COLOR", "1")  # what CI services set; a log file still gets plain text
    make_console().print("[yellow]warning:[/yellow] something")
    assert capsys.readouterr().out == "warning: something\n"


def test_status_and_logs_commands_read_the_run_directory(tmp_path: Path) -> None:
    """``status`` prints the recorded state and reason; ``logs`` the driver's and workers' lines merged by time
    (a traceback stays with its line, a line being written is not printed), never metrics JSON."""
    from encdec.launcher.rundir import write_status

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = _run_dir(tmp_path, driver_pid=dead.pid, host=socket.gethostname())
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "train/loss": 0.5}) + "\n")
    write_status(run_dir, "running", "2 workers")
    out = _cli("status", str(run_dir))
    assert "state: ended without recording why" in out.stdout, out.stdout + out.stderr
    write_status(run_dir, "failed", "TooManyBadTilesError: 21 of 132 tiles bad (at step 4)")
    out = _cli("status", str(run_dir))
    assert "state: failed - TooManyBadTilesError: 21 of 132 tiles bad (at step 4)" in out.stdout
    logs = run_dir / "logs"
    logs.mkdir()
    (logs / "driver.log").write_text("2026-01-01 10:00:00,000 driver INFO run started\n"
                                     "2026-01-01 10:00:09,000 driver ERROR failed: TooManyBadTilesError\n")
    (logs / "rank0.log").write_text("2026-01-01 10:00:05,000 rank0 INFO encdec.train: step 2/4 loss 0.5\n"
                                    "2026-01-01 10:00:08,000 rank0 ERROR encdec.worker: rank 0 failed\n"
                                    "Traceback (most recent call last):\n  TooManyBadTilesError: 21 of 132\n"
                                    "2026-01-01 10:00:09,500 rank0 INFO half a li")
    out = _cli("logs", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "2026-01-01 10:00:00,000 driver INFO run started",
        "2026-01-01 10:00:05,000 rank0 INFO encdec.train: step 2/4 loss 0.5",
        "2026-01-01 10:00:08,000 rank0 ERROR encdec.worker: rank 0 failed",
        "Traceback (most recent call last):",
        "  TooManyBadTilesError: 21 of 132",
        "2026-01-01 10:00:09,000 driver ERROR failed: TooManyBadTilesError",
    ]
    assert _cli("logs", str(run_dir), "--tail", "1").stdout == "2026-01-01 10:00:09,000 driver ERROR failed: " \
                                                                "TooManyBadTilesError\n"


def test_print_logs_follows_new_files_and_lines_until_the_driver_ends(tmp_path: Path) -> None:
    from encdec.launcher.rundir import print_logs

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "driver.log").write_text("2026-01-01 10:00:00,000 driver INFO run started\n")
    state = {"alive": True}

    def worker() -> None:
        time.sleep(0.3)
        with open(logs / "rank1.log", "a") as f:
            f.write("2026-01-01 10:00:01,000 rank1 INFO step 1")
            f.flush()
            time.sleep(0.3)
            f.write("\n")
        time.sleep(0.3)
        state["alive"] = False

    t = threading.Thread(target=worker)
    t.start()
    out = io.StringIO()
    print_logs(tmp_path, tail=None, follow=True, out=out, alive=lambda: state["alive"], poll_s=0.05)
    t.join()
    assert out.getvalue().splitlines() == ["2026-01-01 10:00:00,000 driver INFO run started",
                                           "2026-01-01 10:00:01,000 rank1 INFO step 1"]
