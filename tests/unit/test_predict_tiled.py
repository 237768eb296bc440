"""Tiled predict: exactness against a full-scene forward and against TerraTorch 1.2.11's ``tiled_inference``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from encdec.predict.windows import TiledParams, plan_windows
from tests.unit._predict_models import SeededFCN, TinyFCN, random_scene, tiled_logits, write_scene

FIXTURES = Path(__file__).parent / "fixtures"


def _full_forward(model: torch.nn.Module, data: np.ndarray, delta: int) -> np.ndarray:
    x = torch.nn.functional.pad(torch.from_numpy(data)[None], (delta,) * 4, mode="reflect")
    with torch.no_grad():
        return model(x)[0, :, delta:-delta, delta:-delta].numpy()


@pytest.mark.parametrize("strip_rows", [7, 2048])
@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_tiled_equals_full_forward_of_reflect_padded_scene(tmp_path: Path, strip_rows: int, batch_size: int) -> None:
    # receptive radius 2 < delta 4: every kept window pixel equals the full forward; 50 x 77 is no multiple of 32
    data = random_scene(3, 50, 77)
    path = write_scene(tmp_path / "s.tif", data)
    model = TinyFCN().eval()
    tiled = {"crop": 32, "stride": 24, "delta": 4, "batch_size": batch_size}
    got = tiled_logits(model, path, tiled, strip_rows=strip_rows)
    want = _full_forward(model, data, 4)
    assert got.shape == want.shape == (3, 50, 77)
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize(("read_threads", "read_cache_mb", "blocksize"),
                         [(2, 128, 16), (3, 128, 16), (1, 0, 16), (2, 0, None), (1, 128, 48)])
def test_readers_and_block_cache_change_no_output_bit(tmp_path: Path, read_threads: int, read_cache_mb: int,
                                                      blocksize: int | None) -> None:
    # several readers (each its own handle, every n-th window row) must feed the model in plan order; rows served
    # from kept block chunks (16- or 48-row blocks, 32-row windows: spans over two chunks) equal plain reads
    data = random_scene(3, 150, 77)
    path = write_scene(tmp_path / "s.tif", data, blocksize=blocksize)
    tiled = {"crop": 32, "stride": 24, "delta": 4, "batch_size": 5}
    one = tiled_logits(TinyFCN().eval(), path, tiled, strip_rows=60, read_cache_mb=0)
    many = tiled_logits(TinyFCN().eval(), path, tiled, strip_rows=60, read_threads=read_threads,
                        read_cache_mb=read_cache_mb)
    assert np.array_equal(one, many)
    assert np.abs(one - _full_forward(TinyFCN().eval(), data, 4)).max() <= 1e-5


def test_a_failing_reader_thread_raises_its_error_instead_of_hanging(tmp_path: Path) -> None:
    import rasterio

    from encdec.predict.engine import run_strip
    from encdec.predict.runner import make_forward, make_preprocess
    from encdec.predict.scenes import open_scene

    path = write_scene(tmp_path / "s.tif", random_scene(3, 150, 77))
    scene = open_scene(str(path))
    plan = plan_windows(150, 77, TiledParams(crop=32, stride=24, delta=4, batch_size=2))
    opened = []

    def open_src() -> object:
        opened.append(1)
        if len(opened) == 2:  # the second reader's handle
            raise OSError("disk went away")
        return rasterio.open(path)

    with rasterio.open(path) as src, pytest.raises(OSError, match="disk went away"):
        run_strip(src, scene, plan, plan.strips[0], make_forward(TinyFCN(), device="cpu"),
                  make_preprocess(None, None, None), lambda *a: None, queue_windows=2, read_threads=3,
                  open_src=open_src)


def test_a_failing_writer_raises_its_error_in_the_caller(tmp_path: Path) -> None:
    import rasterio

    from encdec.predict.engine import run_strip
    from encdec.predict.runner import make_forward, make_preprocess
    from encdec.predict.scenes import open_scene

    path = write_scene(tmp_path / "s.tif", random_scene(3, 150, 77))
    scene = open_scene(str(path))
    plan = plan_windows(150, 77, TiledParams(crop=32, stride=24, delta=4, batch_size=2))
    calls = []

    def sink(row: int, values: np.ndarray, valid: np.ndarray) -> None:
        calls.append(row)
        if len(calls) == 2:
            raise OSError("no space left on device")

    with rasterio.open(path) as src, pytest.raises(OSError, match="no space left"):
        run_strip(src, scene, plan, plan.strips[0], make_forward(TinyFCN(), device="cpu"),
                  make_preprocess(None, None, None), sink)
    assert len(calls) == 2  # nothing written after the failure


def test_writer_keeps_row_order_when_wide_blocks_are_written_by_the_caller() -> None:
    import threading
    import time

    from encdec.predict.engine import _BackgroundSink

    got: list[tuple[int, str]] = []

    def sink(row: int, values: np.ndarray, valid: np.ndarray) -> None:
        time.sleep(0.01)  # a slow writer: small blocks queue up behind it
        got.append((row, threading.current_thread().name))

    writer = _BackgroundSink(sink, max_bytes=1000)
    sizes = [10, 10, 400, 10, 10, 10]  # floats per block: 400 (1.6 kB) is over the bound
    for row, n in enumerate(sizes):
        writer(row, np.zeros((1, 1, n), np.float32), np.ones((1, n), bool))
    writer.close()
    assert [r for r, _ in got] == list(range(len(sizes)))
    assert got[2][1] == threading.current_thread().name and got[0][1] == got[5][1] == "predict-write"


def test_plan_has_no_gaps_and_strips_partition_rows() -> None:
    for h, w in [(50, 77), (45, 58), (45, 61), (17, 13), (5, 3), (1, 1), (300, 40), (9, 40)]:
        plan = plan_windows(h, w, TiledParams(crop=16, stride=12, delta=2), strip_rows=20)
        assert plan.strips[0].y0 == 0 and plan.strips[-1].y1 == h
        assert all(a.y1 == b.y0 for a, b in zip(plan.strips, plan.strips[1:]))
        cover = np.zeros((max(h, 12), max(w, 12)), int)
        for r in plan.rows:
            for c in plan.cols:
                cover[r: r + 12, c: c + 12] += 1
        assert (cover > 0).all(), (h, w)


def _reference() -> tuple[np.lib.npyio.NpzFile, dict]:
    ref = np.load(FIXTURES / "terratorch_tiled_reference.npz")
    return ref, json.loads(str(ref["meta"]))


@pytest.mark.parametrize("case", ["avg_blend", "last_wins", "avg_noblend", "rect_delta_reduced"])
def test_matches_terratorch_tiled_inference(case: str) -> None:
    ref, meta = _reference()
    assert meta["terratorch"] == "1.2.11"
    kw = {**meta["cases"][case], "batch_size": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the delta reduction warning, as TerraTorch gives it
        got = tiled_logits(SeededFCN().eval(), FIXTURES / "terratorch_tiled_scene.tif", kw, strip_rows=9)
    want = ref[case]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5, case


def test_windows_are_added_exactly_where_terratorch_leaves_pixels_uncovered() -> None:
    _, meta = _reference()
    for size, raises in meta["raises_crop16_stride12_delta2"].items():
        h, w = map(int, size.split("x"))
        assert (plan_windows(h, w, TiledParams(crop=16, stride=12, delta=2)).added > 0) == raises, size


def test_delta_larger_than_overlap_is_reduced_like_terratorch() -> None:
    with pytest.warns(UserWarning, match="reducing delta to 2"):
        t = TiledParams(crop=16, stride=12, delta=8).resolve()
    assert t.delta == 2 and t.out_h == 12


def test_bad_tiled_parameters_name_the_field() -> None:
    with pytest.raises(ValueError, match="stride=40 is larger than h_crop=32"):
        TiledParams(crop=32, stride=40)
    with pytest.raises(ValueError, match="crp"):  # extra="forbid": a misspelt key is an error
        TiledParams(crop=32, crp=3)  # type: ignore[call-arg]
