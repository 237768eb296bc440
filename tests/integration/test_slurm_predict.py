"""``encdec-launch predict ... --slurm``: the predict command as the entry of one Slurm job on the real local
cluster (tests/cluster/local-slurm.sh), submitted the way a user does (the CLI as a subprocess) and followed with
``logs OUT --follow`` / ``status OUT``: a tiny Prithvi + FCN export on one small scene (70 x 90 px, 6 bands).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from slurm_testlib import ensure_local_slurm

pytestmark = [pytest.mark.slurm, pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("encdec-launch")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ENCDEC_RAY_OBJECT_STORE_MB": "300",  # Ray's default: 30% of RAM
           "PATH": f"{SCRIPT.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _export(root: Path) -> Path:
    """A run directory (the quickstart recipe: its cluster section sizes the job) holding a seeded export."""
    from tests.integration.test_predict_cli import write_export

    run = root / "run"
    export = write_export(run / "export")
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["cluster"]["storage"] = str(root)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return export


@pytest.mark.timeout(900)
def test_predict_as_a_slurm_job(tmp_path: Path) -> None:
    from tests.unit._predict_models import write_scene

    ensure_local_slurm()
    export = _export(tmp_path)
    data = np.random.default_rng(0).integers(200, 4000, size=(6, 70, 90)).astype(np.uint16)
    scene = write_scene(tmp_path / "scene_a.tif", data)
    out = tmp_path / "preds"

    sub = _cli("predict", str(export), str(scene), "-o", str(out), "--slurm", "--cpus-per-task", "1", "--time", "15",
               "--no-quicklook")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    launch = json.loads((out / "launch.json").read_text())
    assert (launch["mode"], launch["command"]) == ("slurm", "predict") and launch["slurm_job_id"]
    driver = next(ln for ln in (out / "slurm" / "job.sbatch").read_text().splitlines() if ln.startswith("DRIVER="))
    assert f"encdec-launch predict {export} {scene} --output {out} --no-quicklook" in driver, driver

    follow = _cli("logs", str(out), "--follow", timeout=600)
    assert follow.returncode == 0, follow.stderr
    assert "1 scene(s) written or done, 0 failed" in follow.stdout, follow.stdout[-3000:]
    status = _cli("status", str(out))
    assert "COMPLETED" in status.stdout, status.stdout + status.stderr
    with rasterio.open(scene) as src, rasterio.open(out / "scene_a.tif") as dst:
        assert (dst.crs, dst.transform, dst.shape) == (src.crs, src.transform, src.shape)
        assert (dst.read(1) < 3).all()
