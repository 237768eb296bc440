"""predict on Ray workers: byte-identical to one in-process worker, and a worker killed mid-scene is restarted and
only its unfinished strip is redone, with identical output. The workers run on the session's shared local Ray
cluster (this process joins it as a driver), not on one of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

import encdec
from tests.unit._predict_models import DiesOnce, TinyFCN, random_scene, write_scene

pytestmark = pytest.mark.ray
TILED = {"crop": 32, "stride": 24, "delta": 4, "batch_size": 3}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_scene(root / "a.tif", random_scene(3, 130, 70, seed=1))
    write_scene(root / "b.tif", random_scene(3, 50, 101, seed=2))
    return root


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tif"))}


def test_one_vs_two_workers_byte_identical(ray_driver: None, scenes: Path, tmp_path: Path) -> None:
    kw = {"tiled": TILED, "strip_rows": 30, "probabilities": "float16", "quicklook": False}
    one = encdec.predict(TinyFCN(), scenes, tmp_path / "one", workers=1, **kw)
    two = encdec.predict(TinyFCN(), scenes, tmp_path / "two", workers=2, **kw)
    assert not one.failed and not two.failed
    assert one.windows == two.windows > 0
    a, b = _bytes(tmp_path / "one"), _bytes(tmp_path / "two")
    assert sorted(a) == ["a.tif", "a_probabilities.tif", "b.tif", "b_probabilities.tif"]
    assert a == b


def test_killed_worker_is_restarted_and_output_identical(ray_driver: None, scenes: Path, tmp_path: Path) -> None:
    kw = {"tiled": TILED, "strip_rows": 30, "quicklook": False, "tags": {"model": "tiny"}}  # same tags: same bytes
    ref = encdec.predict(TinyFCN(), scenes / "a.tif", tmp_path / "ref", **kw)
    marker = tmp_path / "killed"
    res = encdec.predict(DiesOnce(str(marker)), scenes / "a.tif", tmp_path / "out", workers=2, **kw)
    assert marker.exists(), "the worker was not killed"
    assert not res.failed
    assert _bytes(tmp_path / "out") == _bytes(tmp_path / "ref")
    assert res.windows == ref.windows  # the killed strip's windows are counted once (its retry)


def test_one_ray_worker_and_gpus_the_cluster_lacks(ray_driver: None, scenes: Path, tmp_path: Path) -> None:
    import ray

    from encdec.predict.errors import PredictError

    kw = {"tiled": TILED, "strip_rows": 30, "quicklook": False}
    local = encdec.predict(TinyFCN(), scenes / "a.tif", tmp_path / "here", **kw)
    remote = encdec.predict(TinyFCN(), scenes / "a.tif", tmp_path / "ray", on_ray=True, **kw)  # one actor
    assert local.windows == remote.windows > 0 and _bytes(tmp_path / "here") == _bytes(tmp_path / "ray")
    assert ray.cluster_resources().get("GPU", 0) == 0
    with pytest.raises(PredictError, match=r"2 workers x gpus_per_worker=1 need 2 GPUs; the Ray cluster has 0"):
        encdec.predict(TinyFCN(), scenes / "a.tif", tmp_path / "gpu", workers=2, gpus_per_worker=1, **kw)


def test_a_scene_whose_assembly_fails_is_listed_and_the_others_written(ray_driver: None, scenes: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "a_probabilities.tif").mkdir(parents=True)  # where a's output must go: a folder, so writing it fails
    res = encdec.predict(TinyFCN(), scenes, out, workers=2, tiled=TILED, strip_rows=30, probabilities=True,
                         quicklook=False)
    assert list(res.failed) == [str(scenes / "a.tif")] and "a_probabilities.tif" in res.failed[str(scenes / "a.tif")]
    assert (out / "b.tif").is_file() and (out / "b_probabilities.tif").is_file() and not (out / "a.tif").exists()
