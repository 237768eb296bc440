"""Scalar predict is resumable and atomic: a run killed mid-way leaves no table, only the finished scenes' parts;
the rerun skips them and writes the same bytes as an uninterrupted run; ``overwrite`` redoes every scene; a part
made with other settings, or not one we wrote, is recomputed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import encdec
from tests.unit._predict_models import random_scene, write_scene
from tests.unit._predict_scalar_models import TinyScalar

TILED = {"crop": 32, "stride": 32, "delta": 0, "batch_size": 3}  # 64x40 scene: 4 windows, 2 forwards


class Killed(BaseException):
    """What no ``except Exception`` catches: the run stops here as a killed process would."""


class Counting(TinyScalar):
    """Counts its forwards (batches); raises :class:`Killed` on the ``kill_at``-th one."""

    def __init__(self, kill_at: int = 0) -> None:
        super().__init__()
        self.calls, self.kill_at = 0, kill_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed
        return super().forward(x)


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    root = tmp_path / "scenes"
    root.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        write_scene(root / f"{name}.tif", random_scene(3, 64, 40, seed=i))
    return root


def _tables(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.*")) if p.suffix in (".csv", ".parquet")}


def test_killed_run_leaves_no_table_and_the_rerun_skips_finished_scenes(scenes: Path, tmp_path: Path) -> None:
    kw = {"task": "classification", "tiled": TILED, "class_names": ["crop", "forest"]}
    ref = encdec.predict(Counting(), scenes, tmp_path / "ref", **kw)
    assert not ref.failed and ref.windows == 12 and len(_tables(tmp_path / "ref")) in (2, 4)

    out = tmp_path / "out"
    with pytest.raises(Killed):  # 3rd forward: the first batch of b
        encdec.predict(Counting(kill_at=3), scenes, out, **kw)
    assert _tables(out) == {}  # no table until every scene is done
    assert (out / ".parts" / "a" / "scalar.json").exists() and not (out / ".parts" / "b").exists()

    model = Counting()
    res = encdec.predict(model, scenes, out, **kw)
    assert res.skipped_done == [str(scenes / "a.tif")] and res.windows == 8 and model.calls == 4  # b and c only
    assert _tables(out) == _tables(tmp_path / "ref")
    assert set(res.outputs) == {str(scenes / f"{n}.tif") for n in "abc"}

    again = Counting()
    res = encdec.predict(again, scenes, out, **kw)  # all done: nothing computed, the same tables
    assert again.calls == 0 and res.windows == 0 and len(res.skipped_done) == 3
    assert _tables(out) == _tables(tmp_path / "ref")

    redo = Counting()
    res = encdec.predict(redo, scenes, out, overwrite=True, **kw)
    assert redo.calls == 6 and res.windows == 12 and res.skipped_done == []
    assert _tables(out) == _tables(tmp_path / "ref")


def test_a_stale_or_unreadable_part_is_recomputed(scenes: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    encdec.predict(Counting(), scenes / "a.tif", out, task="scalar_regression", tiled=TILED)
    model = Counting()
    res = encdec.predict(model, scenes / "a.tif", out, task="scalar_regression", tiled={**TILED, "stride": 16})
    assert res.skipped_done == [] and res.windows == 6 and model.calls == 2  # rows 0,16,32 x cols 0,8
    assert len((out / "windows.csv").read_text().splitlines()) == 1 + 6
    (out / ".parts" / "a" / "scalar.json").write_text("[1, 2")  # not a part we wrote: recomputed, not a crash
    res = encdec.predict(Counting(), scenes / "a.tif", out, task="scalar_regression", tiled=TILED)
    assert res.skipped_done == [] and res.windows == 4 and not res.failed


def test_dry_run_shows_scenes_with_a_finished_part_as_done(scenes: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from encdec.launcher.commands.predict_cmd import ModelSpec, _dry_run
    from encdec.predict.outputs import OutputSpec
    from encdec.predict.windows import TiledParams

    out = tmp_path / "out"
    encdec.predict(Counting(), scenes / "a.tif", out, task="classification", tiled=TILED, class_names=["crop"])
    spec = ModelSpec("export", tmp_path, None, "classification", {"num_classes": 4}, None, class_names=("crop",))
    args = argparse.Namespace(scenes=[str(scenes)], output=str(out), strip_rows=2048, gdal=None, queue_windows=32,
                              overwrite=False)
    assert _dry_run(spec, args, TiledParams(**TILED), OutputSpec(quicklook=False)) == 0
    lines = capsys.readouterr().out.splitlines()[2:5]
    states = {line.split()[0]: line.split("  ")[-1] for line in lines}
    assert states == {"a": "done (skipped)", "b": "to do", "c": "to do"}
    res_a = encdec.predict(Counting(), scenes / "a.tif", tmp_path / "again", task="classification", tiled=TILED)
    assert f" {res_a.windows} " in lines[0] and "table rows" in lines[0], lines[0]  # scalar windows, not map strips
