"""predict on Ray workers: byte-identical to one in-process worker, and a worker killed mid-scene is restarted and
only its unfinished strip is redone, with identical output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import encdec
from tests.unit._predict_models import DiesOnce, TinyFCN, random_scene, write_scene

pytestmark = pytest.mark.ray
TILED = {"crop": 32, "stride": 24, "delta": 4, "batch_size": 3}


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir="/tmp/ray-pred", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_scene(root / "a.tif", random_scene(3, 130, 70, seed=1))
    write_scene(root / "b.tif", random_scene(3, 50, 101, seed=2))
    return root


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tif"))}


def test_one_vs_two_workers_byte_identical(ray_local: None, scenes: Path, tmp_path: Path) -> None:
    kw = {"tiled": TILED, "strip_rows": 30, "probabilities": "float16", "quicklook": False}
    one = encdec.predict(TinyFCN(), scenes, tmp_path / "one", workers=1, **kw)
    two = encdec.predict(TinyFCN(), scenes, tmp_path / "two", workers=2, **kw)
    assert not one.failed and not two.failed
    assert one.windows == two.windows > 0
    a, b = _bytes(tmp_path / "one"), _bytes(tmp_path / "two")
    assert sorted(a) == ["a.tif", "a_probabilities.tif", "b.tif", "b_probabilities.tif"]
    assert a == b


def test_killed_worker_is_restarted_and_output_identical(ray_local: None, scenes: Path, tmp_path: Path) -> None:
    kw = {"tiled": TILED, "strip_rows": 30, "quicklook": False, "tags": {"model": "tiny"}}  # same tags: same bytes
    ref = encdec.predict(TinyFCN(), scenes / "a.tif", tmp_path / "ref", **kw)
    marker = tmp_path / "killed"
    res = encdec.predict(DiesOnce(str(marker)), scenes / "a.tif", tmp_path / "out", workers=2, **kw)
    assert marker.exists(), "the worker was not killed"
    assert not res.failed
    assert _bytes(tmp_path / "out") == _bytes(tmp_path / "ref")
    assert res.windows == ref.windows  # the killed strip's windows are counted once (its retry)
