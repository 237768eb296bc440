"""``encdec-launch tune`` on the embedded local Ray: a seeded search of the quickstart with one hopeless learning
rate; ASHA stops the hopeless trial early, best.yaml trains, rerunning the command finishes at once; search keys
are validated before any cluster starts."""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import pytest
from launcher_testlib import launch, quick_args

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_bad_search_keys_fail_before_any_cluster(quick_tiles: Path, tmp_path: Path) -> None:
    out = launch(["tune", *quick_args(quick_tiles, tmp_path / "runs"), "--search", "optim.lrr=choice(1e-4, 1e-3)",
                  "--search", "train.max_steps=choice(10, -1)", "--search", "optim.lr=loguniform(0, 1)"], timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    err = out.stderr
    assert "optim.lrr" in err and "Did you mean 'lr'" in err  # the recipe's own did-you-mean
    assert "train.max_steps" in err and "-1" in err
    assert "loguniform" in err and "0 < lo < hi" in err
    assert "Ray cluster" not in out.stdout and not (tmp_path / "runs").exists()


def test_asha_stops_the_hopeless_trial_and_best_yaml_trains(quick_tiles: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    temp = f"/tmp/ray-t{os.getpid()}"
    args = ["tune", *quick_args(quick_tiles, storage, "--workers-per-node", "1", "--ray-temp-dir", temp,
                                "--set", "train.max_steps=16", "--set", "train.val_every=4", "--set", "train.log_every=4",
                                "--set", "train.ckpt_every=100", "--set", "optim.warmup_steps=0",
                                "--set", "run.export=false", "--set", "tune.metric=val/loss",
                                "--set", "tune.grace_steps=4", "--set", "run.seed=2"),
            "--search", "optim.lr=choice(1e-9, 1e-3)", "--trials", "2"]
    # run.seed=2 seeds the random search too: it samples lr 1e-3 first, then 1e-9
    out = launch(args, timeout=1500)
    shutil.rmtree(temp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    search = storage / "quickstart-search"
    rows = list(csv.DictReader(open(search / "results.csv")))
    assert len(rows) == 2 and all(Path(r["run_dir"]).parent == search / "runs" for r in rows)
    good = [r for r in rows if float(r["optim.lr"]) == 1e-3]
    hopeless = [r for r in rows if float(r["optim.lr"]) == 1e-9]
    assert good and hopeless, rows
    # ASHA compares a trial with those that reached its rung before: a hopeless trial after a good one stops at
    # the first rung (step 4 of 16); a good trial never does
    assert any(r["status"] == "stopped by ASHA" and int(r["steps"]) < 16 for r in hopeless), rows
    assert all(r["status"] == "finished" and int(r["steps"]) == 16 for r in good), rows
    assert max(float(r["best"]) for r in good) < min(float(r["best"]) for r in hopeless)
    assert (search / "trials.png").stat().st_size > 0
    best = (search / "best.yaml").read_text()
    assert "lr: 0.001" in best and "tune:" not in best
    assert "trials" in out.stdout and "best.yaml" in out.stdout

    t0 = time.monotonic()
    again = launch(args, timeout=300)  # the same command: the search has finished, nothing reruns
    assert again.returncode == 0 and "nothing to rerun" in again.stdout, again.stdout + again.stderr
    assert "starting a local Ray cluster" not in again.stdout
    assert time.monotonic() - t0 < 60

    trained = launch([str(search / "best.yaml"), "--storage", str(tmp_path / "best"), "--no-progress",
                      "--ray-temp-dir", temp, "--set", "train.max_steps=2", "--set", "train.val_every=2"], timeout=900)
    shutil.rmtree(temp, ignore_errors=True)
    assert trained.returncode == 0, trained.stdout[-4000:] + trained.stderr[-4000:]
    assert "finished" in trained.stdout


def test_optuna_search_and_restore_reruns_no_finished_trial(quick_tiles: Path, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    temp = f"/tmp/ray-o{os.getpid()}"
    args = ["tune", *quick_args(quick_tiles, storage, "--workers-per-node", "1", "--ray-temp-dir", temp,
                                "--set", "train.max_steps=4", "--set", "train.val_every=4", "--set", "train.log_every=4",
                                "--set", "run.export=false", "--set", "tune.search=optuna",
                                "--set", "tune.scheduler=none", "--set", "track.tensorboard=true"),
            "--search", "optim.lr=loguniform(1e-4, 1e-2)", "--trials", "2", "--search-dir", str(tmp_path / "opt")]
    out = launch(args, timeout=1200)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    assert "search optuna" in out.stdout
    rows = list(csv.DictReader(open(tmp_path / "opt" / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "finished" and 1e-4 <= float(r["optim.lr"]) <= 1e-2 for r in rows)
    for r in rows:  # each trial is tracked like a run (track.tensorboard)
        assert list((Path(r["run_dir"]) / "tensorboard").glob("events.out.tfevents.*")), r
    lines = {r["run_dir"]: len((Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()) for r in rows}
    # as if the driver died after the trials and before the table: rerunning restores the Tune experiment, whose
    # trials have all terminated, so none trains again
    (tmp_path / "opt" / "results.csv").unlink()
    again = launch(args, timeout=600)
    shutil.rmtree(temp, ignore_errors=True)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-5000:]
    rows = list(csv.DictReader(open(tmp_path / "opt" / "results.csv")))
    assert {r["run_dir"]: len((Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()) for r in rows} == lines
