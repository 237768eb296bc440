"""The quickstart end to end, submitted as a Ray Job to the shared cluster (token auth) and followed: checkpoints,
metrics.csv, plot, export, mIoU; ``status``/``logs``; the dashboard's Jobs and Train views and Ray's metrics
endpoint; and the plan's memory estimate against the workers' measured peak."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from launcher_testlib import launch, popen, quick_args, run_dirs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MIOU_BAR = 0.70  # the quickstart's stated bar on the held-out tiles (it reaches ~0.75 by step 50, ~0.80 at 150)
MEMORY_BAR = 0.25  # the plan's per-worker estimate vs the measured peak RSS


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=20) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def test_quickstart_as_ray_job_end_to_end(ray_cluster: object, quick_tiles: Path, tmp_path: Path) -> None:
    c = ray_cluster
    storage = tmp_path / "runs"
    args = quick_args(quick_tiles, storage, "--submit", "--address", c.dashboard_url,  # type: ignore[attr-defined]
                      "--set", "train.max_steps=60", "--set", "train.val_every=30", "--set", "train.ckpt_every=30")
    proc = popen(args, tmp_path / "submit.log")
    seen = {"metrics": False, "train_view": False}
    headers = c.headers()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        dirs = run_dirs(storage) if storage.is_dir() else []
        if dirs and not seen["train_view"]:
            code, body = _get(c.dashboard_url + "/api/train/v2/runs/v1", headers)  # type: ignore[attr-defined]
            seen["train_view"] = code == 200 and dirs[0].name in body
        if not seen["metrics"]:
            for port in c.metrics_ports:  # type: ignore[attr-defined]
                code, body = _get(f"http://127.0.0.1:{port}/metrics")
                seen["metrics"] |= code == 200 and bool(re.search(r"encdec_train_loss\{[^}]*run=", body))
        time.sleep(3)
    log = (tmp_path / "submit.log").read_text()
    assert proc.wait(timeout=60) == 0, log[-5000:]
    (run_dir,) = run_dirs(storage)

    # the job: recorded, followed (its driver's log streamed back), listed by the Jobs API behind the token
    record = json.loads((run_dir / "launch.json").read_text())
    job_id = record["job_id"]
    assert record["mode"] == "ray-job" and job_id == f"encdec-{run_dir.name}"
    assert "step 60/60" in log and "SUCCEEDED" in log and "summary" in log
    status = launch(["status", str(run_dir)], timeout=120)
    assert f"job {job_id}: SUCCEEDED" in status.stdout and "last report: step=60" in status.stdout, status.stdout
    logs = launch(["logs", str(run_dir), "--tail", "400"], timeout=120)
    assert logs.returncode == 0 and "val mIoU" in logs.stdout
    url = c.dashboard_url  # type: ignore[attr-defined]
    assert _get(url + "/")[0] == 200
    assert _get(url + "/api/jobs/")[0] == 401  # token auth: no token, no jobs
    code, body = _get(url + "/api/jobs/", headers)
    assert code == 200 and any(j.get("submission_id") == job_id for j in json.loads(body))
    token = headers["Authorization"].split()[-1]
    written = "".join(p.read_text(errors="replace") for p in run_dir.rglob("*")
                      if p.is_file() and p.suffix in (".json", ".yaml", ".jsonl", ".csv", ".out", ".log"))
    assert token not in log + status.stdout + logs.stdout + written

    # outputs
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert int(last["step"]) == 60 and float(last["val/mIoU"]) >= MIOU_BAR, last
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "checkpoints" / "step_00000060" / "meta.json").is_file()
    recipe_text = (run_dir / "recipe.yaml").read_text()
    assert "max_steps: 60" in recipe_text and str(quick_tiles) in recipe_text
    assert {"torch", "ray", "python", "code"} <= set(json.loads((run_dir / "versions.json").read_text()))

    # the export loads strictly into a plain model and predicts what the trained (LoRA) model predicts
    import safetensors.torch
    import torch
    import yaml

    from encdec.launcher.commands.export_cmd import restore
    from encdec.launcher.recipe.validate import load_recipe
    from encdec.models import build_model

    doc = yaml.safe_load((run_dir / "export" / "model.yaml").read_text())
    assert "peft_config" not in doc["model"]
    plain = build_model(doc["task"], **doc["model"])
    plain.load_state_dict(safetensors.torch.load_file(run_dir / "export" / "model.safetensors"), strict=True)
    trained = restore(run_dir, load_recipe(run_dir / "recipe.yaml"), run_dir / "checkpoints" / "step_00000060")
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x).output, trained.eval()(x).output, rtol=1e-4, atol=1e-4)

    # the dashboard's Train view listed the run; Ray's metrics endpoint exported the run's gauges
    assert seen["train_view"], "the run never appeared in /api/train/v2/runs/v1"
    assert seen["metrics"], "no encdec_train_loss gauge on any node's /metrics"

    # the plan's per-worker memory estimate against each worker's measured peak RSS
    from encdec.launcher.preflight.plan import GiB, make_plan

    plan = make_plan(load_recipe(run_dir / "recipe.yaml"))
    workers = [json.loads(p.read_text()) for p in sorted((run_dir / "workers").glob("rank*.json"))]
    assert len(workers) == 2
    for w in workers:
        measured = w["mem/peak_rss_gb"] * GiB
        assert abs(plan.chosen_total() - measured) / measured < MEMORY_BAR, (
            f"plan {plan.chosen_total() / GiB:.3f} GiB vs rank peak {w['mem/peak_rss_gb']:.3f} GiB (RSS at start "
            f"{w['start_rss_gb']:.3f}, peak reset {w.get('peak_rss_reset')})")
    print(f"plan {plan.chosen_total() / GiB:.3f} GiB vs measured {[round(w['mem/peak_rss_gb'], 3) for w in workers]}"
          f" GiB; RSS at worker start {[round(w['start_rss_gb'], 3) for w in workers]} GiB")
