"""The one Backend protocol: every launch target takes any command (an Entry) and follows it the same way.

Kubernetes is exercised against a stand-in ``kubectl`` on PATH (a script that records its arguments: there is no
Kubernetes here); the local target against a stand-in driver process (a run's driver is only a pid and the
``metrics.jsonl`` it appends to). Real Slurm and a real Ray Job: tests/integration/test_backends_follow.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import yaml

from encdec.launcher.backends.base import BACKENDS, Entry, Run, backend_for_args, backend_for_run
from encdec.launcher.backends.k8s_backend import Kubernetes
from encdec.launcher.backends.ray_backend import LocalRay, RayJob
from encdec.launcher.backends.slurm_backend import Slurm

ROOT = Path(__file__).resolve().parents[2]
RECIPE = {"task": "segmentation", "run": {"name": "probe"}, "cluster": {"storage": "/shared/runs"}}


def _write_recipe(path: Path, storage: Path) -> Path:
    """The quickstart recipe, named ``probe``, with its storage under ``storage``."""
    doc = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    doc["run"]["name"] = "probe"
    doc.setdefault("cluster", {})["storage"] = str(storage)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "encdec.launcher.cli", *args], capture_output=True, text=True,
                          env=full, timeout=timeout, check=False)


def _run_dir(tmp_path: Path, **launch: object) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (run_dir / "launch.json").write_text(json.dumps(launch))
    return run_dir


def check_entry(recipe_path: Path) -> Entry:
    """A tiny command as a launch entry: validate the recipe (``encdec-launch recipe RECIPE``) where it runs."""
    from encdec.launcher.recipe.validate import load_recipe

    recipe = load_recipe(recipe_path)

    def run_here(make_run_dir: object, args: argparse.Namespace, console: object) -> int:
        from encdec.launcher.cli import main

        return main(["recipe", str(recipe_path)])

    return Entry(name="check", recipe=recipe, argv=lambda run_dir, rp: ["encdec-launch", "recipe", rp],
                 run_here=run_here, needs_ray_address=False)


def test_one_backend_per_mode_and_the_flags_pick_it() -> None:
    ns = argparse.Namespace(slurm=False, k8s=False, submit=False, address=None)
    picked = {}
    for flag, value in (("slurm", True), ("k8s", True), ("submit", True), ("address", "10.0.0.1:6379"), (None, None)):
        args = argparse.Namespace(**{**vars(ns), **({flag: value} if flag else {})})
        picked[flag] = backend_for_args(args).mode
    assert picked == {"slurm": "slurm", "k8s": "k8s", "submit": "ray-job", "address": "ray-address", None: "local"}
    assert sorted(set(picked.values())) == sorted(BACKENDS)
    for mode in BACKENDS:
        assert backend_for_run(Run(None, {"mode": mode})).mode == mode


def test_a_new_command_reaches_every_target_through_one_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    recipe_path = _write_recipe(tmp_path / "recipe.yaml", tmp_path)
    entry = check_entry(recipe_path)
    run_dir = tmp_path / "run"
    # Slurm: the batch script's driver; the script's appended --address goes to bash's unused positionals
    script = Slurm(argparse.Namespace()).preview(entry, run_dir)
    (driver,) = [ln for ln in script.splitlines() if ln.startswith("DRIVER=")]
    assert f"encdec-launch recipe {run_dir}/recipe.yaml" in driver and driver.startswith("DRIVER=(bash -c")
    # Kubernetes: the RayJob's entrypoint
    docs = list(yaml.safe_load_all(Kubernetes().preview(entry, run_dir)))
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert shlex.split(job["spec"]["entrypoint"]) == ["encdec-launch", "recipe", "/etc/encdec/recipe.yaml"]
    # the local cluster: the same entry runs in this process
    assert LocalRay(argparse.Namespace()).submit(entry, lambda: run_dir, None) == 0
    assert f"{recipe_path}: ok" in capsys.readouterr().out
    # a Ray Job (real cluster): tests/integration/test_backends_follow.py
    assert RayJob.submit is not None


def test_kubernetes_status_logs_follow_stop_call_kubectl(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys, time
        with open({str(calls)!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        if sys.argv[1] == "get":
            print("Running RUNNING", end="")
        elif sys.argv[1] == "logs":
            for i in range(3):
                print(f"step {{i}}", flush=True)
                if "--follow" in sys.argv:
                    time.sleep(0.2)
        elif sys.argv[1] == "delete":
            print('rayjob.ray.io "encdec-probe" deleted')
        """))
    kubectl.chmod(0o755)
    run_dir = _run_dir(tmp_path, mode="k8s", k8s_rayjob="encdec-probe", k8s_namespace="ml")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    follow = _cli("logs", str(run_dir), "--follow", env=env)
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.splitlines() == ["step 0", "step 1", "step 2"]
    status = _cli("status", str(run_dir), env=env)
    assert "RayJob encdec-probe: RUNNING (deployment Running)" in status.stdout, status.stderr
    tail = _cli("logs", str(run_dir), "--tail", "5", env=env)
    stop = _cli("stop", str(run_dir), env=env)
    assert stop.returncode == 0 and "deleted RayJob encdec-probe" in stop.stdout, stop.stderr
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert recorded == [
        ["logs", "job/encdec-probe", "--namespace", "ml", "--follow"],
        ["get", "rayjob", "encdec-probe", "--namespace", "ml", "-o",
         "jsonpath={.status.jobDeploymentStatus} {.status.jobStatus}"],
        ["logs", "job/encdec-probe", "--namespace", "ml", "--tail", "5"],
        ["delete", "rayjob", "encdec-probe", "--namespace", "ml"],
    ]
    assert tail.returncode == 0


def test_kubernetes_launch_records_the_rayjob(tmp_path: Path) -> None:
    recipe_path = _write_recipe(tmp_path / "recipe.yaml", tmp_path)
    doc = yaml.safe_load(recipe_path.read_text())   # what --k8s needs: an image, the data on the mounted storage
    doc["cluster"]["image"] = "registry.example/encdec:1"
    for split in ("train", "val"):
        doc["data"][split]["tiles"] = str(tmp_path / split)
    recipe_path.write_text(yaml.safe_dump(doc))
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    class Console:
        def print(self, text: str) -> None:
            self.text = text

    assert Kubernetes().submit(check_entry(recipe_path), lambda: run_dir, Console()) == 0
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch == {"mode": "k8s", "k8s_rayjob": "encdec-probe", "k8s_namespace": None}
    assert (run_dir / "rayjob.yaml").is_file()


def test_local_logs_follow_until_the_driver_exits(tmp_path: Path) -> None:
    """``logs --follow`` of a local run streams metrics.jsonl while its driver lives, and returns when it exits."""
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    run_dir.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""\
        import json, time
        for step in range(1, 6):
            with open({str(metrics)!r}, "a") as f:
                f.write(json.dumps({{"step": step}}))   # half a line first: follow prints whole lines only
                f.flush()
                time.sleep(0.1)
                f.write("\\n")
            time.sleep(0.3)
        """)])
    reaper = threading.Thread(target=writer.wait)   # a real driver is nobody's child here: leave no zombie
    reaper.start()
    _run_dir(tmp_path, mode="local", driver_pid=writer.pid, host=socket.gethostname())
    follow = _cli("logs", str(run_dir), "--follow", timeout=60)
    reaper.join(timeout=30)
    assert follow.returncode == 0, follow.stderr
    assert [json.loads(line)["step"] for line in follow.stdout.splitlines()] == [1, 2, 3, 4, 5]
    status = _cli("status", str(run_dir))
    assert "driver not running" in status.stdout and "last report: step=5" in status.stdout


def test_slurm_job_name_error_names_a_flag_that_exists() -> None:
    from encdec.launcher.backends import slurm
    from encdec.launcher.cli import build_parser

    with pytest.raises(slurm.SlurmConfigError) as err:
        slurm.resolve_options(RECIPE, {"extra": ["--job-name=mine"]})
    msg = str(err.value)
    assert "--job-name" in msg and "--name" in msg
    flags = {o for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions  # type: ignore[union-attr]
             for o in a.option_strings}
    assert "--name" in flags and "--job-name" not in flags


def test_progress_sink_failures_warn_once_then_stay_quiet(caplog: pytest.LogCaptureFixture) -> None:
    from encdec.launcher.ray.driver import WarnOnce

    def broken() -> list[object]:
        raise TimeoutError("sink did not answer within 10 s")

    calls = WarnOnce("reading the progress sink")
    with caplog.at_level("WARNING"):
        results = [calls.call(broken, []) for _ in range(5)] + [calls.call(lambda: [1], [])]
    assert results == [[], [], [], [], [], [1]] and calls.failures == 5
    (record,) = caplog.records
    assert "reading the progress sink failed (TimeoutError: sink did not answer" in record.getMessage()


def _export_beside_run(storage: Path) -> Path:
    """A run directory (its recipe sizes the job) with an export folder in it; no weights are read here."""
    run = storage / "run"
    run.mkdir(parents=True)
    _write_recipe(run / "recipe.yaml", storage)
    doc = yaml.safe_load((run / "recipe.yaml").read_text())
    doc["cluster"]["image"] = "registry.example/encdec:1"
    (run / "recipe.yaml").write_text(yaml.safe_dump(doc))
    export = run / "export"
    export.mkdir()
    (export / "model.yaml").write_text(yaml.safe_dump({"task": "segmentation", "model": doc["model"]}))
    (export / "model.safetensors").write_bytes(b"")
    return export


def test_command_argv_rebuilds_a_command_without_its_target_flags(tmp_path: Path) -> None:
    from encdec.launcher.backends.flags import command_argv
    from encdec.launcher.cli import build_parser

    args = build_parser().parse_args(["predict", "m", "a.tif", "s3://b/c.tif", "-o", "out", "--slurm", "--nodes", "2",
                                      "--partition", "gpu", "--set", "tiled.crop=32", "--set", "x=1",
                                      "--probabilities", "--address", "h:1", "--dry-run"])
    cwd = Path.cwd()
    assert command_argv("predict", args, path_dests=("model", "scenes", "output")) == [
        "encdec-launch", "predict", str(cwd / "m"), str(cwd / "a.tif"), "s3://b/c.tif", "--output", str(cwd / "out"),
        "--probabilities", "--set", "tiled.crop=32", "--set", "x=1", "--nodes", "2"]
    args = build_parser().parse_args(["evaluate", "m", "--split", "val", "--k8s", "--probabilities", "float16"])
    assert command_argv("evaluate", args) == ["encdec-launch", "evaluate", "m", "--split", "val",
                                              "--probabilities", "float16"]


def test_predict_k8s_dry_run_renders_the_predict_command(tmp_path: Path) -> None:
    """`encdec-launch predict MODEL SCENES -o OUT --k8s --dry-run`: the RayJob runs the predict command."""
    sys.path.insert(0, str(Path(__file__).parent))
    import jsonschema
    from test_cluster_yaml import SCHEMA

    storage = tmp_path / "shared"
    export = _export_beside_run(storage)
    scene, outside = storage / "scenes" / "a.tif", tmp_path / "b.tif"
    out = _cli("predict", str(export), str(scene), str(outside), "-o", str(storage / "preds"), "--k8s", "--dry-run",
               "--nodes", "2", "--set", "tiled.crop=32")
    assert out.returncode == 0, out.stderr[-3000:]
    docs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    jsonschema.validate(job, SCHEMA)
    assert shlex.split(job["spec"]["entrypoint"]) == [
        "encdec-launch", "predict", str(export), str(scene), str(outside), "--output", str(storage / "preds"),
        "--set", "tiled.crop=32", "--nodes", "2", "--address", "auto"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2   # --nodes sizes the job, not the training recipe's cluster.nodes
    assert f"entrypoint argument='{outside}' is on no volume the pods mount" in out.stderr
    assert str(scene) not in out.stderr
    assert not (storage / "preds").exists()   # a dry run creates nothing


def test_predict_on_a_target_needs_a_recipe_for_the_job(tmp_path: Path) -> None:
    export = _export_beside_run(tmp_path / "shared")
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("model.yaml", "model.safetensors"):
        (lone / name).write_bytes((export / name).read_bytes())
    out = _cli("predict", str(lone), "a.tif", "-o", str(tmp_path / "p"), "--slurm", "--dry-run")
    assert out.returncode == 3
    assert "predict on Slurm needs a recipe: its cluster section sizes the job" in out.stderr, out.stderr


def test_submit_to_target_makes_the_job_directory_and_keeps_off_another_run(tmp_path: Path) -> None:
    from encdec.launcher.backends.base import command_entry, submit_to_target
    from encdec.launcher.recipe.errors import LaunchError
    from encdec.launcher.recipe.validate import load_recipe

    storage = tmp_path / "shared"
    doc = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    doc["cluster"].update(storage=str(storage), image="registry.example/encdec:1")
    for split in ("train", "val"):
        doc["data"][split]["tiles"] = str(storage / split)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    recipe = load_recipe(tmp_path / "r.yaml")
    args = argparse.Namespace(command="recipe", check=[str(storage / "r.yaml")], overrides=[], schema=False,
                              k8s=True, slurm=False, submit=False, address=None)
    entry = command_entry("recipe", args, recipe, run_here=lambda: 0, path_dests=("check",), needs_ray_address=False)
    console = argparse.Namespace(print=lambda *a, **k: None)
    storage.mkdir()
    trained = _run_dir(storage, mode="local")   # a training run: its recipe must not be overwritten
    with pytest.raises(LaunchError, match=r"is the directory of another run .*command 'train'.*Fix: give recipe an "):
        submit_to_target(entry, args, console, job_dir=trained)
    job_dir = storage / "check"
    assert submit_to_target(entry, args, console, job_dir=job_dir) == 0
    launch = json.loads((job_dir / "launch.json").read_text())
    assert (launch["mode"], launch["command"], launch["k8s_rayjob"]) == ("k8s", "recipe", "encdec-quickstart")
    (job,) = [d for d in yaml.safe_load_all((job_dir / "rayjob.yaml").read_text()) if d["kind"] == "RayJob"]
    assert shlex.split(job["spec"]["entrypoint"]) == ["encdec-launch", "recipe", str(storage / "r.yaml")]
    assert submit_to_target(entry, args, console, job_dir=job_dir) == 0   # the same command again: its own dir
