"""``encdec-launch tune`` on the shared local Ray cluster (``--address``), CI-sized: 1-worker trials of the tiny
quickstart, a few steps each. A seeded search with one hopeless learning rate: ASHA stops the hopeless trial early,
rerunning the command finishes at once, best.yaml trains (a short run that records its end and logs quietly: issue
17's status.json, ``status``, ``logs``, plain output to a pipe). Search keys are validated before any cluster starts. A
second search, ``tune --slurm``, runs inside one allocation of the local Slurm cluster and uses Optuna (the footprint
check caps max_concurrent to what the allocation holds), a parent MLflow run with the trials as its children, and a
rerun on the shared cluster that restores it without a new trial or MLflow run."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import pytest
from launcher_testlib import launch, quick_args, run_dirs

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _tiny(tiles: Path, storage: Path, *extra: str) -> list[str]:
    """The quickstart as a 1-worker trial that validates every 2 steps and never exports."""
    return quick_args(tiles, storage, "--workers-per-node", "1", "--set", "train.val_every=2",
                      "--set", "train.log_every=2", "--set", "train.ckpt_every=100", "--set", "optim.warmup_steps=0",
                      "--set", "run.export=false", *extra)


def test_bad_search_keys_fail_before_any_cluster(quick_tiles: Path, tmp_path: Path) -> None:
    out = launch(["tune", *quick_args(quick_tiles, tmp_path / "runs"), "--search", "optim.lrr=choice(1e-4, 1e-3)",
                  "--search", "train.max_steps=choice(10, -1)", "--search", "optim.lr=loguniform(0, 1)"], timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    err = out.stderr
    assert "optim.lrr" in err and "Did you mean 'lr'" in err  # the recipe's own did-you-mean
    assert "train.max_steps" in err and "-1" in err
    assert "loguniform" in err and "0 < lo < hi" in err
    assert "Ray cluster" not in out.stdout and not (tmp_path / "runs").exists()


def test_asha_stops_the_hopeless_trial_and_best_yaml_trains(ray_cluster: object, quick_tiles: Path,
                                                            tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    address = ray_cluster.gcs_address  # type: ignore[attr-defined]
    args = ["tune", *_tiny(quick_tiles, storage, "--address", address, "--set", "train.max_steps=12",
                           "--set", "train.val_every=4", "--set", "optim.schedule=constant",
                           "--set", "tune.metric=val/loss", "--set", "tune.grace_steps=8", "--set", "run.seed=2"),
            "--search", "optim.lr=choice(1e-9, 1e-3)", "--trials", "2"]
    # run.seed=2 seeds the random search too: it samples lr 1e-3 first, then 1e-9 (max_concurrent 1: in turn)
    out = launch(args, timeout=900)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    assert "1 at a time" in out.stdout
    search = storage / "quickstart-search"
    rows = list(csv.DictReader(open(search / "results.csv")))
    assert len(rows) == 2 and all(Path(r["run_dir"]).parent == search / "runs" for r in rows)
    good = [r for r in rows if float(r["optim.lr"]) == 1e-3]
    hopeless = [r for r in rows if float(r["optim.lr"]) == 1e-9]
    assert good and hopeless, rows
    # ASHA compares a trial with those that reached its rung before: the hopeless trial, after the good one, stops
    # at the rung at step 8 (of 12); the good trial never does. Measured (val/loss, constant lr): 1e-3 is 0.733 at
    # step 4 (worse than 1e-9's 0.712: the first steps at 1e-3 overshoot) and 0.708 at step 8 (1e-9: 0.714)
    assert all(r["status"] == "stopped by ASHA" and 8 <= int(r["steps"]) < 12 for r in hopeless), rows
    assert all(r["status"] == "finished" and int(r["steps"]) == 12 for r in good), rows
    assert max(float(r["best"]) for r in good) < min(float(r["best"]) for r in hopeless)
    assert (search / "trials.png").stat().st_size > 0
    best = (search / "best.yaml").read_text()
    assert "lr: 0.001" in best and "tune:" not in best
    assert "trials" in out.stdout and "best.yaml" in out.stdout

    t0 = time.monotonic()
    again = launch(args, timeout=300)  # the same command: the search has finished, nothing reruns
    assert again.returncode == 0 and "nothing to rerun" in again.stdout, again.stdout + again.stderr
    assert "search " + str(search) + ":" not in again.stdout
    assert time.monotonic() - t0 < 60

    # best.yaml trains: a short run (1 worker, as in the search), output to a pipe as in a log file or CI
    _short_run_records_its_end_and_logs_quietly(search / "best.yaml", tmp_path / "best", address)


def _short_run_records_its_end_and_logs_quietly(recipe: Path, storage: Path, address: str) -> None:
    """Issue 17, on one short run of ``recipe`` through the CLI: ``status.json`` says it finished and why,
    ``status`` prints it, ``logs`` shows the driver's and the workers' log lines (not metrics JSON), and the output
    has no colour codes, no matplotlib warning, and a summary table within 100 columns."""
    out = launch([str(recipe), "--storage", str(storage), "--no-progress", "--address", address,
                  "--workers-per-node", "1", "--set", "train.max_steps=4", "--set", "train.log_every=2",
                  "--set", "train.val_every=4", "--set", "train.ckpt_every=4", "--set", "run.export=false"],
                 timeout=600, env={"FORCE_COLOR": "1"})  # what CI services set: a pipe must still get plain text
    both = out.stdout + out.stderr
    assert out.returncode == 0, both[-5000:]
    assert "finished" in out.stdout
    (run_dir,) = run_dirs(storage)

    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["reason"] == "4 steps" and status["step"] == 4
    assert status["started"] <= status["ended"]
    shown = launch(["status", str(run_dir)], timeout=120)
    assert "state: finished - 4 steps" in shown.stdout, shown.stdout + shown.stderr

    logs = launch(["logs", str(run_dir)], timeout=120)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert any(" driver INFO step 4/4 " in ln for ln in lines), logs.stdout
    assert any(" rank0 INFO encdec.train: step 4/4 loss" in ln for ln in lines), logs.stdout
    assert any(" driver INFO finished: 4 steps" in ln for ln in lines), logs.stdout
    assert not any(ln.lstrip().startswith("{") for ln in lines), "metrics JSON is not a log"
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["driver.log", "rank0.log"]  # one worker

    assert "\x1b[" not in both + logs.stdout, [ln for ln in both.splitlines() if "\x1b[" in ln][:5]
    assert "No artists with labels" not in both
    lines = out.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.rstrip() == "summary")  # the title, padded to the width
    table = [lines[start]]
    for ln in lines[start + 1:]:
        if not "\u2500" <= ln[:1] <= "\u257f":  # box-drawing characters: the table's rows and rules
            break
        table.append(ln)
    assert len(table) > 10 and max(len(ln) for ln in table) <= 100, "\n".join(table)


@pytest.mark.slurm
@pytest.mark.timeout(1200)
def test_optuna_search_in_one_slurm_allocation_parent_mlflow_run_and_restore(ray_cluster: object, quick_tiles: Path,
                                                                           tmp_path: Path) -> None:
    """``tune --slurm``: the Optuna search runs inside one allocation of the local Slurm cluster (1 CPU: the fit
    check caps max_concurrent to one trial at a time), with a parent MLflow run and the trials as its children;
    rerunning the command on the shared Ray cluster restores it without a new trial or MLflow run. (One search for
    the Slurm and the Optuna/MLflow/restore checks: each search costs a minute or more.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
    from mlflow.tracking import MlflowClient
    from slurm_testlib import ensure_local_slurm, job_logs, wait_for

    from encdec.launcher.backends import slurm

    ensure_local_slurm()
    storage = tmp_path / "runs"
    opt = tmp_path / "opt"
    env = {"ENCDEC_RAY_OBJECT_STORE_MB": "300",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")]))}
    search = ["--set", "train.max_steps=2", "--set", "tune.search=optuna", "--set", "tune.scheduler=none",
              "--set", "tune.max_concurrent=8", "--set", "track.tensorboard=true", "--set", "track.mlflow.experiment=opt"]
    space = ["--search", "optim.lr=loguniform(1e-4, 1e-2)", "--trials", "2", "--search-dir", str(opt)]
    out = launch(["tune", *_tiny(quick_tiles, storage, *search, "--slurm", "--cpus-per-task", "1", "--time", "20"),
                  *space], timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    job_id = str(slurm.read_record(opt)["job_id"])
    assert f"submitted Slurm job {job_id}" in out.stdout and not (opt / "results.csv").exists()
    wait_for("the search's job to end", lambda: slurm.status(opt).finished, 1100, debug=lambda: job_logs(opt),
             interval=2)
    status = slurm.status(opt)
    assert status.state == "COMPLETED", f"{status}\n{job_logs(opt)}"
    text = slurm.logs(opt)
    # one allocation of 1 CPU: the search ran inside it, through `tune --address`, one 1-CPU trial at a time (the
    # fit check capped max_concurrent 8 to what the allocation's cluster holds)
    assert "tune" in text and "--address" in text and "1 at a time" in text, text[-3000:]
    assert "search optuna" in text and "tune.max_concurrent 8 -> 1" in text, text[-3000:]
    assert "1 worker x 0.5 CPU + 0.5 CPU for its driver = 1 CPU, ~1." in text, text[-3000:]
    rows = list(csv.DictReader(open(opt / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "finished" and int(r["steps"]) == 2 for r in rows), rows
    assert all(1e-4 <= float(r["optim.lr"]) <= 1e-2 for r in rows), rows
    assert all(Path(r["run_dir"]).parent == opt / "runs" for r in rows)
    assert (opt / "best.yaml").is_file()
    st = launch(["status", str(opt)], timeout=120)
    assert "COMPLETED" in st.stdout, st.stdout + st.stderr
    for r in rows:  # each trial is tracked like a run (track.tensorboard)
        assert list((Path(r["run_dir"]) / "tensorboard").glob("events.out.tfevents.*")), r

    def mlflow_runs() -> tuple[MlflowClient, dict[str, object], list[object]]:
        client = MlflowClient(tracking_uri=f"sqlite:///{opt / 'mlflow' / 'mlflow.db'}")  # one store per search
        runs = client.search_runs([client.get_experiment_by_name("opt").experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("encdec.kind") == "search"]
        return client, parent, [r for r in runs if r is not parent]

    client, parent, children = mlflow_runs()
    assert parent.info.status == "FINISHED" and len(children) == 2  # type: ignore[attr-defined]
    pid = parent.info.run_id  # type: ignore[attr-defined]
    assert json.loads((opt / "tracking.json").read_text())["mlflow"]["run_id"] == pid
    params = parent.data.params  # type: ignore[attr-defined]
    assert params["space.optim.lr"] == "loguniform(1e-4, 1e-2)" and params["tune.search"] == "optuna"
    assert params["tune.trials"] == "2" and params["tune.metric"] == "val/mIoU"
    best = max(float(r["best"]) for r in rows)
    assert parent.data.metrics["val/mIoU"] == pytest.approx(best)  # type: ignore[attr-defined]
    assert {"best.yaml", "results.csv", "trials.png", "recipe.yaml"} <= {a.path for a in client.list_artifacts(pid)}
    for child in children:
        tags = child.data.tags  # type: ignore[attr-defined]
        assert tags["mlflow.parentRunId"] == pid and child.info.status == "FINISHED", tags  # type: ignore[attr-defined]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/mIoU")] == [2]  # type: ignore[attr-defined]
        assert tags["encdec.run_dir"] in {r["run_dir"] for r in rows}
    assert parent.data.tags["encdec.best_run_id"] in {c.info.run_id for c in children}  # type: ignore[attr-defined]

    lines = {r["run_dir"]: len((Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()) for r in rows}
    # as if the driver died after the trials and before the table: rerunning the command (here on the shared
    # cluster: where a search runs is not part of it) restores the Tune experiment, whose trials have all
    # terminated, so none trains again, and the same parent run is continued
    (opt / "results.csv").unlink()
    address = ray_cluster.gcs_address  # type: ignore[attr-defined]
    again = launch(["tune", *_tiny(quick_tiles, storage, *search, "--address", address), *space], timeout=600)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-5000:]
    rows = list(csv.DictReader(open(opt / "results.csv")))
    assert {r["run_dir"]: len((Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()) for r in rows} == lines
    client, parent, children = mlflow_runs()  # no duplicate parent, no new child
    assert parent.info.run_id == pid and len(children) == 2  # type: ignore[attr-defined]
    assert len(client.get_metric_history(pid, "val/mIoU")) == 1
