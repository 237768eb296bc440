"""Streaming one row strip of a scene through the model: read, preprocess, batch, forward, blend, emit rows.

Memory is bounded by the window size, never by the scene: a reader thread reads one padded window row
(``h_crop`` rows of the scene, reflect-mapped) at a time and feeds a bounded queue of windows; the accumulator
holds ``crop - 2*delta`` output rows. Rows above the next window's top are final and are handed to ``sink``.

The result of a pixel depends only on the plan (the strip's window list, batches cut from it in order), never on
which worker runs the strip: 1 worker and N workers write the same bytes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
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

_ROW_END = object()


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
    """Reads window rows of a scene: rows ``[r - delta, r - delta + h_crop)`` (reflected at the scene's top and
    bottom), all columns; :meth:`window` cuts a window out of such a row in padded column coordinates.

    GDAL decodes a file's whole blocks for a read and, for a multi-band read, does not keep them: each window row
    decoded its block rows again (4x the work for 128-row windows in 512-row blocks). So rows are read in chunks
    aligned to the file's blocks and the chunks a window row still needs are kept, as long as they fit in
    ``cache_bytes`` (a wider scene is read window row by window row: memory stays flat in scene size).
    Only windows that reach past the scene's left or right edge are gathered through the reflection map; the others
    are views of the row.
    """

    def __init__(self, src: object, scene: SceneInfo, plan: WindowPlan, cache_bytes: int = 128 << 20) -> None:
        self.src, self.scene, self.t = src, scene, plan.tiling
        d = self.t.delta
        we = max(scene.width, self.t.out_w)
        self.col_map = reflect_index(np.arange(-d, we + d), scene.width)
        shapes = getattr(src, "block_shapes", None)
        block_h = max(1, int(shapes[0][0])) if shapes else self.t.h_crop
        self.chunk = block_h * -(-self.t.h_crop // block_h)  # >= h_crop rows, whole blocks
        row_bytes = scene.width * len(scene.bands_read) * np.dtype(scene.dtype).itemsize
        if 2 * self.chunk * row_bytes > cache_bytes:  # chunk >= h_crop: a window row spans at most two
            self.chunk = 0  # too wide to keep: plain reads
        self.chunks: dict[int, np.ndarray] = {}

    def _span(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` of the scene, every column, the bands read."""
        from rasterio.windows import Window as RioWindow

        bands, width = list(self.scene.bands_read), self.scene.width
        if not self.chunk:
            return self.src.read(bands, window=RioWindow(0, lo, width, hi - lo))  # type: ignore[attr-defined,no-any-return]
        first, last = lo // self.chunk, (hi - 1) // self.chunk
        for k in [k for k in self.chunks if k < first]:  # rows only go down: earlier chunks are done
            del self.chunks[k]
        for k in range(first, last + 1):
            if k not in self.chunks:
                r0 = k * self.chunk
                n = min(self.chunk, self.scene.height - r0)
                self.chunks[k] = self.src.read(bands, window=RioWindow(0, r0, width, n))  # type: ignore[attr-defined]
        parts = [self.chunks[k] for k in range(first, last + 1)]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        base = first * self.chunk
        return rows[:, lo - base: hi - base]

    def read(self, r: int) -> np.ndarray:
        rows = reflect_index(np.arange(r - self.t.delta, r - self.t.delta + self.t.h_crop), self.scene.height)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        block = self._span(lo, hi)
        if hi - lo == len(rows) and rows[0] == lo and bool(np.all(np.diff(rows) == 1)):
            return block  # no reflected row: the span is the window row
        return block[:, rows - lo]

    def window(self, block: np.ndarray, col: int) -> np.ndarray:
        """Padded columns ``[col, col + w_crop)`` of a row from :meth:`read`."""
        c0, w = col - self.t.delta, self.t.w_crop
        if c0 >= 0 and c0 + w <= self.scene.width:
            return block[:, :, c0: c0 + w]
        return block[:, :, self.col_map[col: col + w]]


def _produce(src: object | Callable[[], AbstractContextManager[object]], scene: SceneInfo, plan: WindowPlan,
             rows: list[list[Window]], preprocess: PreprocessFn, out: queue.Queue[object],
             stop: threading.Event, cache_bytes: int) -> None:
    """Read, preprocess and queue the windows of ``rows`` (each row followed by ``_ROW_END``).

    ``src`` is an open dataset, or a callable opening one for this thread (GDAL handles are not thread-safe).
    """
    try:
        with (src() if callable(src) else contextlib.nullcontext(src)) as handle:
            reader = _RowReader(handle, scene, plan, cache_bytes)
            t = plan.tiling
            for row in rows:
                block = reader.read(row[0].row)
                for w in row:
                    raw = reader.window(block, w.col)
                    x = np.ascontiguousarray(preprocess(raw), dtype=np.float32)
                    inner = raw[:, t.delta: t.delta + t.out_h, t.delta: t.delta + t.out_w]
                    if not _put(out, (w, x, invalid_mask(inner, scene.nodata)), stop):
                        return
                if not _put(out, _ROW_END, stop):
                    return
    except BaseException as e:  # handed to the consumer, which re-raises it with its traceback
        _put(out, e, stop)


def _put(q: queue.Queue[object], item: object, stop: threading.Event) -> bool:
    """Put unless the consumer has stopped (then False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False


def _window_rows(windows: tuple[Window, ...]) -> list[list[Window]]:
    """The strip's windows grouped into consecutive rows (the plan lists them row by row)."""
    rows: list[list[Window]] = []
    for w in windows:
        if not rows or rows[-1][0].row != w.row:
            rows.append([])
        rows[-1].append(w)
    return rows


def _in_order(queues: list[queue.Queue[object]], n_rows: int) -> Iterator[tuple[Window, np.ndarray, np.ndarray]]:
    """Row ``i`` comes from reader ``i % len(queues)``: the windows in plan order, whatever the reader count."""
    for i in range(n_rows):
        q = queues[i % len(queues)]
        while True:
            item = q.get()
            if item is _ROW_END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]


def _batches(items: Iterator[tuple[Window, np.ndarray, np.ndarray]],
             batch_size: int) -> Iterator[list[tuple[Window, np.ndarray, np.ndarray]]]:
    batch: list[tuple[Window, np.ndarray, np.ndarray]] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class _BackgroundSink:
    """Hands final rows to ``sink`` on a writer thread, in order, so that turning blended rows into products and
    compressing them overlaps the next forward passes (the sink gets arrays nobody else holds).

    Rows in flight (queued or being written) are bounded by ``max_bytes``. A block larger than that (a wide scene:
    ~33 MB for 224 rows of a 16k-pixel, 2-class scene) is written by the caller once the writer is idle, as without
    the thread: handing it over would hold it and its products beside the next forward pass (+77 MB peak RSS on
    a 16k scene), and peak memory must stay flat in scene size.
    """

    def __init__(self, sink: RowSink, max_bytes: int = 16 << 20) -> None:
        self.sink, self.max_bytes = sink, max_bytes
        self.items: list[tuple[int, np.ndarray, np.ndarray] | None] = []
        self.inflight = 0  # bytes queued or being written
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._work, daemon=True, name="predict-write")
        self.thread.start()

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                item = self.items.pop(0)
            if item is None:
                return
            if self.error is None:  # after an error, drain without writing so that the producer never blocks
                try:
                    self.sink(*item)
                except BaseException as e:
                    self.error = e
            with self.cond:
                self.inflight -= item[1].nbytes + item[2].nbytes
                self.cond.notify_all()

    def _put(self, item: tuple[int, np.ndarray, np.ndarray] | None, nbytes: int) -> None:
        with self.cond:
            while self.inflight and self.inflight + nbytes > self.max_bytes:
                self.cond.wait()
            self.inflight += nbytes
            self.items.append(item)
            self.cond.notify_all()

    def __call__(self, row: int, values: np.ndarray, valid: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        nbytes = values.nbytes + valid.nbytes
        if nbytes <= self.max_bytes:
            self._put((row, values, valid), nbytes)
            return
        with self.cond:  # too big to hold beside the next forward: write it here, after the rows before it
            while self.inflight:
                self.cond.wait()
        if self.error is not None:
            raise self.error
        self.sink(row, values, valid)

    def close(self, discard: bool = False) -> None:
        """Wait until every row is written and raise the writer's error (``discard``: after a failure, just stop)."""
        if self.thread.is_alive():
            self._put(None, 0)
            self.thread.join()
        if self.error is not None and not discard:
            raise self.error


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
              on_batch: Callable[[int], None] | None = None, read_threads: int = 1,
              open_src: Callable[[], AbstractContextManager[object]] | None = None,
              read_cache_mb: int = 128) -> StripStats:
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
        read_threads: Reader threads, each reading every ``read_threads``-th window row through its own dataset
            handle from ``open_src`` (a fast accelerator outruns one reader; on CPU one is best: readers take the
            forward's cores). Windows reach the model in plan order whatever the count, so outputs do not change.
        open_src: Opens another handle of the scene (needed for ``read_threads > 1``).
        read_cache_mb: Decoded block rows each reader keeps (see ``_RowReader``); 0 reads every window row anew.
    """
    import time

    stats = StripStats()
    if plan.single:
        _run_single(src, scene, forward, preprocess, sink, stats)
        if on_batch is not None:
            on_batch(1)
        return stats
    rows = _window_rows(strip.windows)
    n = max(1, min(read_threads if open_src is not None else 1, len(rows)))
    size = max(queue_windows // n, plan.tiling.batch_size)
    queues: list[queue.Queue[object]] = [queue.Queue(maxsize=size) for _ in range(n)]
    stop = threading.Event()
    threads = [threading.Thread(target=_produce, daemon=True, name=f"predict-read-{scene.name}-{strip.index}-{k}",
                                args=(src if n == 1 else open_src, scene, plan, rows[k::n], preprocess,
                                      queues[k], stop, read_cache_mb << 20))
               for k in range(n)]
    for th in threads:
        th.start()
    writer = _BackgroundSink(sink)
    acc = _Accumulator(plan, strip, writer)
    try:
        for batch in _batches(_in_order(queues, len(rows)), plan.tiling.batch_size):
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
        writer.close()
    finally:
        stop.set()
        writer.close(discard=True)
        for th in threads:
            th.join()
    return stats
