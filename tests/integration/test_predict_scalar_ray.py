"""Scalar predict on Ray workers (the session's shared local cluster, joined as a driver): two workers, one of them
killed mid-run (restarted, its scene retried), write the same table bytes as one in-process worker; a scene that
fails on a worker is listed while the others are written."""

from __future__ import annotations

from pathlib import Path

import pytest

import encdec
from tests.unit._predict_models import random_scene, write_scene
from tests.unit._predict_scalar_models import DiesOnceScalar, TinyScalar

pytestmark = pytest.mark.ray
TILED = {"crop": 32, "stride": 24, "delta": 0, "batch_size": 3}
KW = {"task": "classification", "tiled": TILED, "class_names": ["crop", "forest"]}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scalar_scenes")
    write_scene(root / "a.tif", random_scene(3, 70, 50, seed=1))
    write_scene(root / "b.tif", random_scene(4, 40, 40, seed=2))  # 4 bands: the 3-band model fails on the worker
    write_scene(root / "c.tif", random_scene(3, 50, 81, seed=3))
    write_scene(root / "d.tif", random_scene(3, 20, 26, seed=4))
    return root


def _tables(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.*")) if p.suffix in (".csv", ".parquet")}


def test_two_workers_one_killed_write_the_tables_of_one(ray_driver: None, scenes: Path, tmp_path: Path) -> None:
    one = encdec.predict(TinyScalar(), scenes, tmp_path / "one", workers=1, **KW)
    # one run on two actors checks both (actor start-ups are the cost): one dies on its 2nd forward (any actor
    # reaches it: 7 forwards in all), is restarted and its scene retried
    marker = tmp_path / "killed"
    two = encdec.predict(DiesOnceScalar(str(marker)), scenes, tmp_path / "two", workers=2, **KW)
    assert marker.exists(), "the worker was not killed"
    bad = str(scenes / "b.tif")
    assert list(one.failed) == list(two.failed) == [bad]  # listed; the other scenes are written
    assert "RuntimeError" in two.failed[bad] and bad not in two.outputs and len(two.outputs) == 3
    assert one.windows == two.windows == 6 + 8 + 1  # the killed scene's windows are counted once (its retry)
    a, b = _tables(tmp_path / "one"), _tables(tmp_path / "two")
    assert {"windows.csv", "scenes.csv"} <= set(a)
    assert a == b
    rows = (tmp_path / "two" / "scenes.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(scenes / f"{n}.tif") for n in "acd"]  # scene order as found
