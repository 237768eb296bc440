"""``encdec-launch predict ... --submit --address DASHBOARD``: predict as a real Ray Job on the shared cluster
(token auth), followed with ``logs --follow`` / ``status``; a second submission into the same output folder is a
new job (Ray never reuses a submission id) that resumes: the scene is already done."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.integration.test_slurm_predict import _cli, _export

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_predict_as_a_ray_job_then_resubmitted(ray_cluster: object, tmp_path: Path) -> None:
    from tests.unit._predict_models import write_scene

    export = _export(tmp_path)
    data = np.random.default_rng(0).integers(200, 4000, size=(6, 70, 90)).astype(np.uint16)
    scene = write_scene(tmp_path / "scene_a.tif", data)
    out = tmp_path / "preds"
    url = ray_cluster.dashboard_url  # type: ignore[attr-defined]

    first = _cli("predict", str(export), str(scene), "-o", str(out), "--submit", "--address", url, "--no-quicklook")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "1 scene(s) written or done, 0 failed" in first.stdout, first.stdout[-3000:]
    launch = json.loads((out / "launch.json").read_text())
    assert (launch["mode"], launch["command"], launch["job_id"]) == ("ray-job", "predict", "encdec-preds")
    assert "SUCCEEDED" in _cli("status", str(out)).stdout
    with rasterio.open(scene) as src, rasterio.open(out / "scene_a.tif") as dst:
        assert (dst.crs, dst.transform, dst.shape) == (src.crs, src.transform, src.shape)
        assert (dst.read(1) < 3).all()

    again = _cli("predict", str(export), str(scene), "-o", str(out), "--submit", "--address", url, "--no-quicklook")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(already done)" in again.stdout and "0 windows" in again.stdout, again.stdout[-3000:]
    assert json.loads((out / "launch.json").read_text())["job_id"] == "encdec-preds-2"
    follow = _cli("logs", str(out), "--follow")
    assert follow.returncode == 0 and "encdec-preds-2" in follow.stdout, follow.stdout[-2000:] + follow.stderr
