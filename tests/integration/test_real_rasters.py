"""Training on tiles cut from a real Landsat scene with nodata borders (rasterio's ``RGB.byte.tif``, committed under
``tests/data/real`` with its licence), each run on the session's shared local Ray cluster (``--address``; the launch's own embedded
cluster is tested in test_launcher_faults.py).

The scene's 3 uint8 bands become a 6-band int16 scene (the 6-band model needs them), cut into 64 px tiles: the
corners of the rotated scene give all-nodata tiles, which are empty, not bad: the run finishes with the default
``data.max_bad_fraction`` and lists them, with their reason, in the summary and ``skipped_tiles.csv``. Copies of
``corrupt.tif`` (3 unnamed bands, blocks that cannot be decoded) among the tiles make a deterministic data error
(too many bad tiles), which fails the run at once instead of being retried ``train.max_failures`` times.

The finishing run also has tracking on with its MLflow server down (a closed port): one warning, and the run and
its other backend (TensorBoard) go on (one run proves both "does not stop a run" cases: a launch costs ~30 s in CI).
"""

from __future__ import annotations

import csv
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from launcher_testlib import REPO, launch, quick_args, run_dirs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REAL = REPO / "tests" / "data" / "real"
HLS = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
SIZE = 64


def cut_landsat_tiles(root: Path, every: int = 1) -> set[str]:
    """6-band tiles (and water-ish masks) cut from RGB.byte.tif; returns the names of the all-nodata tiles."""
    import rasterio
    from rasterio.windows import Window

    root.mkdir(parents=True)
    empty = set()
    with rasterio.open(REAL / "RGB.byte.tif") as src:
        rgb = src.read().astype(np.int16)  # [3, 718, 791], nodata 0 outside the scene
        nodata = (rgb == 0).any(axis=0)
        r, g, b = rgb
        six = np.stack([b, g, r, (r + g) // 2, (g + b) // 2, (r + b) // 2]) * 10  # a 6-band reflectance-like scene
        six[:, nodata] = -9999
        mask = np.where(b > g, 1, 0).astype(np.uint8)
        mask[nodata] = 255
        k = 0
        for row in range(0, src.height - SIZE + 1, SIZE):
            for col in range(0, src.width - SIZE + 1, SIZE):
                k += 1
                if k % every:
                    continue
                win = Window(col, row, SIZE, SIZE)
                sl = np.s_[row:row + SIZE, col:col + SIZE]
                profile = {"driver": "GTiff", "width": SIZE, "height": SIZE, "crs": src.crs,
                           "transform": src.window_transform(win)}
                name = f"t{row:03d}_{col:03d}"
                with rasterio.open(root / f"{name}_img.tif", "w", count=6, dtype="int16", nodata=-9999,
                                   **profile) as ds:
                    ds.write(six[(slice(None), *sl)])
                    ds.descriptions = HLS
                with rasterio.open(root / f"{name}_mask.tif", "w", count=1, dtype="uint8", nodata=255,
                                   **profile) as ds:
                    ds.write(mask[sl][None])
                if nodata[sl].all():
                    empty.add(f"{name}_img.tif")
    return empty


def _args(cluster: object, train: Path, val: Path, storage: Path, *extra: str) -> list[str]:
    """The quickstart recipe on these tiles, on the shared session cluster."""
    return quick_args(Path("/unused"), storage, "--address", cluster.gcs_address,  # type: ignore[attr-defined]
                      "--set", "data.train.synthetic=null", "--set", f"data.train.tiles={train}",
                      "--set", "data.val.synthetic=null", "--set", f"data.val.tiles={val}",
                      "--set", "train.max_steps=6", "--set", "train.log_every=2", "--set", "train.val_every=6",
                      "--set", "train.ckpt_every=6", "--set", "run.export=false", *extra)


def test_landsat_tiles_with_nodata_borders_train_and_list_what_was_skipped(ray_cluster: object, tmp_path: Path) -> None:
    empty = cut_landsat_tiles(tmp_path / "train")
    empty_val = cut_landsat_tiles(tmp_path / "val", every=5)
    assert len(empty) >= 10 and empty_val  # the scene's nodata corners
    storage = tmp_path / "runs"
    with socket.socket() as s:  # a port nothing listens on: the MLflow server is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = launch(_args(ray_cluster, tmp_path / "train", tmp_path / "val", storage, "--set", "track.tensorboard=true",
                       "--set", f"track.mlflow.tracking_uri=http://127.0.0.1:{port}"),
                 env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}, timeout=900)
    text = out.stdout + out.stderr
    (tmp_path / "launch.log").write_text(text)  # kept by pytest's tmp_path retention, for a look afterwards
    assert out.returncode == 0, text[-6000:]  # default data.max_bad_fraction=0.01: empty tiles are not bad
    (run_dir,) = run_dirs(storage)
    with open(run_dir / "skipped_tiles.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["reason"] for r in rows} == {"all-nodata"}
    assert {Path(r["file"]).name for r in rows} <= empty | empty_val
    assert {r["rank"] for r in rows} <= {"0", "1"} and all(r["step"].isdigit() for r in rows)
    assert "skipped tiles" in text and "all-nodata" in text and "skipped_tiles.csv" in text
    assert "PIXELTYPE" not in text
    # the preflight read a sample of tiles on the driver before the cluster was used
    assert "data.train: 132 samples" in text, text[-6000:]
    # the down MLflow server: one warning, the run finished and checkpointed, the other backend still wrote
    assert text.count("mlflow open failed") == 1 and "training continues without it" in text
    assert "step 6/6" in text or "│ steps" in text
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_a_deterministic_data_error_is_not_retried(ray_cluster: object, tmp_path: Path) -> None:
    cut_landsat_tiles(tmp_path / "train", every=4)
    cut_landsat_tiles(tmp_path / "val", every=9)
    names = sorted(p.name for p in (tmp_path / "train").glob("*_img.tif"))
    for name in names[5::6]:  # bad tiles the preflight's sample of 8 may miss (a warning at most): training meets them
        shutil.copy(REAL / "corrupt.tif", tmp_path / "train" / name)
    storage = tmp_path / "runs"
    out = launch(_args(ray_cluster, tmp_path / "train", tmp_path / "val", storage, "--set", "train.max_failures=3"), timeout=900)
    text = out.stdout + out.stderr
    (tmp_path / "launch.log").write_text(text)  # kept by pytest's tmp_path retention, for a look afterwards
    assert out.returncode != 0, text[-6000:]
    assert "a retry would meet again" in text and "TooManyBadTilesError" in text, text[-6000:]
    # Ray's controller log, forwarded to the driver: one worker group, and its failure policy raised at once
    assert text.count("Started training worker group") == 1 and "FailurePolicy] RETRY" not in text
    (run_dir,) = run_dirs(storage)
    # one attempt: each corrupt tile is listed once per rank that met it, never again by a restarted worker group
    with open(run_dir / "skipped_tiles.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    per_rank = [(r["file"], r["rank"]) for r in rows]
    assert rows and len(per_rank) == len(set(per_rank)), rows
