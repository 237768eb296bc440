"""Streaming one row strip of a scene through the model: read, preprocess, batch, forward, blend, emit rows.

Memory is bounded by the window size, never by the scene: a reader thread reads one padded window row
(``h_crop`` rows of the scene, reflect-mapped) at a time and feeds a bounded queue of windows; the accumulator
holds ``crop - 2*delta`` output rows. Rows above the next window's top are final and are handed to ``sink``.

The result of a pixel depends only on the plan (the strip's window list, batches cut from it in order), never on
which worker runs the strip: 1 worker and N workers write the same bytes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from encdec.predict.scenes import SceneInfo
from encdec.predict.windows import Strip, Window, WindowPlan, blend_mask, reflect_index

__all__ = ["ForwardFn", "PreprocessFn", "RowSink", "StripStats", "invalid_mask", "run_strip"]

#: ``batch [B, C, h_crop, w_crop] float32 -> outputs [B, K, h_crop, w_crop] float32`` (no grad, model's device).
ForwardFn = Callable[[np.ndarray], np.ndarray]
#: ``raw window [C, h, w] (file dtype) -> model input [C, h, w] float32``.
PreprocessFn = Callable[[np.ndarray], np.ndarray]
#: ``(first_row, values [K, n, W] float32, valid [n, W] bool)`` for final output rows, top to bottom.
RowSink = Callable[[int, np.ndarray, np.ndarray], None]

_DONE = object()


@dataclass
class StripStats:
    """What one strip cost."""

    windows: int = 0
    batches: int = 0
    forward_s: float = 0.0
    wall_s: float = 0.0


def invalid_mask(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """Pixels where any band equals the scene's nodata value or is NaN: nodata in the output."""
    bad = np.zeros(raw.shape[-2:], dtype=bool)
    if nodata is not None and not np.isnan(nodata):
        bad |= (raw == np.asarray(nodata).astype(raw.dtype)).any(axis=tuple(range(raw.ndim - 2)))
    if raw.dtype.kind == "f":
        bad |= np.isnan(raw).any(axis=tuple(range(raw.ndim - 2)))
    return bad


class _RowReader:
    """Reads padded window rows of a scene: rows ``[r - delta, r - delta + h_crop)``, all padded columns."""

    def __init__(self, src: object, scene: SceneInfo, plan: WindowPlan) -> None:
        self.src, self.scene, self.t = src, scene, plan.tiling
        d = self.t.delta
        we = max(scene.width, self.t.out_w)
        self.col_map = reflect_index(np.arange(-d, we + d), scene.width)

    def read(self, r: int) -> np.ndarray:
        from rasterio.windows import Window as RioWindow

        rows = reflect_index(np.arange(r - self.t.delta, r - self.t.delta + self.t.h_crop), self.scene.height)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        block = self.src.read(list(self.scene.bands_read), window=RioWindow(0, lo, self.scene.width, hi - lo))  # type: ignore[attr-defined]
        return block[:, rows - lo][:, :, self.col_map]


def _produce(src: object, scene: SceneInfo, plan: WindowPlan, windows: tuple[Window, ...], preprocess: PreprocessFn,
             out: queue.Queue[object], stop: threading.Event) -> None:
    try:
        reader = _RowReader(src, scene, plan)
        t = plan.tiling
        cur_row, block = None, None
        for w in windows:
            if w.row != cur_row:
                cur_row, block = w.row, reader.read(w.row)
            assert block is not None
            raw = block[:, :, w.col: w.col + t.w_crop]
            x = np.ascontiguousarray(preprocess(raw), dtype=np.float32)
            inner = raw[:, t.delta: t.delta + t.out_h, t.delta: t.delta + t.out_w]
            item = (w, x, invalid_mask(inner, scene.nodata))
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        out.put(_DONE)
    except BaseException as e:  # handed to the consumer, which re-raises it with its traceback
        out.put(e)


def _batches(q: queue.Queue[object], batch_size: int) -> Iterator[list[tuple[Window, np.ndarray, np.ndarray]]]:
    batch: list[tuple[Window, np.ndarray, np.ndarray]] = []
    while True:
        item = q.get()
        if item is _DONE:
            break
        if isinstance(item, BaseException):
            raise item
        batch.append(item)  # type: ignore[arg-type]
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Accumulator:
    """``out_h`` output rows starting at ``base``: weighted sums, weights, winner ranks and validity."""

    def __init__(self, plan: WindowPlan, strip: Strip, sink: RowSink) -> None:
        self.t, self.strip, self.sink = plan.tiling, strip, sink
        self.h, self.w = plan.height, plan.width
        self.we = max(plan.width, self.t.out_w)
        self.mask = blend_mask(self.t)
        self.base = strip.windows[0].row if strip.windows else strip.y0
        self.acc: np.ndarray | None = None
        self.cnt = np.zeros((self.t.out_h, self.we), np.float32)
        self.valid = np.zeros((self.t.out_h, self.we), bool)
        self.rank = None if self.t.average_patches else np.full((self.t.out_h, self.we), -1, np.int64)

    def _flush(self, upto: int) -> None:
        """Hand rows ``[base, upto)`` to the sink (the part inside the strip and the scene), then shift."""
        n = min(upto, self.base + self.t.out_h) - self.base
        if n <= 0 or self.acc is None:
            return
        lo, hi = max(self.base, self.strip.y0), min(self.base + n, self.strip.y1, self.h)
        if hi > lo:
            a, b = lo - self.base, hi - self.base
            vals = self.acc[:, a:b, : self.w]
            # a new array either way: the buffer is shifted (overwritten) right after, the sink may keep it
            vals = vals / self.cnt[None, a:b, : self.w] if self.t.average_patches else vals.copy()
            self.sink(lo, vals, self.valid[a:b, : self.w].copy())
        keep = self.t.out_h - n
        for arr, fill in ((self.acc, 0), (self.cnt, 0), (self.valid, False), (self.rank, -1)):
            if arr is not None:
                arr[..., :keep, :] = arr[..., n:, :].copy()
                arr[..., keep:, :] = fill
        self.base += n

    def add(self, w: Window, out: np.ndarray, invalid: np.ndarray) -> None:
        if self.acc is None:
            self.acc = np.zeros((out.shape[0], self.t.out_h, self.we), np.float32)
        while w.row > self.base:
            self._flush(w.row)
        d, oh, ow = self.t.delta, self.t.out_h, self.t.out_w
        pred = out[:, d: d + oh, d: d + ow]
        cols = slice(w.col, w.col + ow)
        if self.t.average_patches:
            self.acc[:, :, cols] += pred * self.mask
        else:
            assert self.rank is not None
            win = self.rank[:, cols] < w.rank
            np.copyto(self.acc[:, :, cols], pred, where=win[None])
            self.rank[:, cols][win] = w.rank
        self.cnt[:, cols] += self.mask
        self.valid[:, cols] = ~invalid

    def close(self) -> None:
        while self.base < min(self.strip.y1, self.h):
            self._flush(self.base + self.t.out_h)


def _run_single(src: object, scene: SceneInfo, forward: ForwardFn, preprocess: PreprocessFn, sink: RowSink,
                stats: StripStats) -> StripStats:
    """A scene no larger than one window: one forward pass of the unpadded scene (TerraTorch 1.2.11)."""
    import time

    raw = src.read(list(scene.bands_read))  # type: ignore[attr-defined]
    x = np.ascontiguousarray(preprocess(raw), dtype=np.float32)[None]
    t0 = time.perf_counter()
    y = forward(x)
    stats.forward_s += time.perf_counter() - t0
    y = y[:, None] if y.ndim == 3 else y
    sink(0, np.ascontiguousarray(y[0, :, : scene.height, : scene.width]), ~invalid_mask(raw, scene.nodata))
    stats.windows, stats.batches = 1, 1
    return stats


def run_strip(src: object, scene: SceneInfo, plan: WindowPlan, strip: Strip, forward: ForwardFn,
              preprocess: PreprocessFn, sink: RowSink, *, queue_windows: int = 32,
              on_batch: Callable[[int], None] | None = None) -> StripStats:
    """Predict one strip: every output row in ``[strip.y0, strip.y1)`` goes to ``sink`` exactly once, in order.

    Args:
        src: An open rasterio dataset of ``scene``.
        scene: The scene's header (size, bands to read, nodata).
        plan: The scene's window plan.
        strip: The strip to predict.
        forward: The model on a batch (see :data:`ForwardFn`).
        preprocess: Raw window -> model input (band order as read; normalisation, nodata fill).
        sink: Receives final rows (see :data:`RowSink`).
        queue_windows: Windows read ahead of the forward pass (bounds memory: one window's input each).
        on_batch: Called with the number of windows after each forward (progress).
    """
    import time

    stats = StripStats()
    if plan.single:
        _run_single(src, scene, forward, preprocess, sink, stats)
        if on_batch is not None:
            on_batch(1)
        return stats
    q: queue.Queue[object] = queue.Queue(maxsize=max(queue_windows, plan.tiling.batch_size))
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(src, scene, plan, strip.windows, preprocess, q, stop),
                              daemon=True, name=f"predict-read-{scene.name}-{strip.index}")
    thread.start()
    acc = _Accumulator(plan, strip, sink)
    try:
        for batch in _batches(q, plan.tiling.batch_size):
            x = np.stack([b[1] for b in batch])
            t0 = time.perf_counter()
            y = forward(x)
            stats.forward_s += time.perf_counter() - t0
            if y.ndim == 3:  # [B, h, w]: one output channel
                y = y[:, None]
            for (w, _, invalid), out in zip(batch, y, strict=True):
                acc.add(w, out, invalid)
            stats.windows += len(batch)
            stats.batches += 1
            if on_batch is not None:
                on_batch(len(batch))
        acc.close()
    finally:
        stop.set()
        thread.join()
    return stats
