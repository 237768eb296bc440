"""Scalar tasks (``classification``, ``scalar_regression``): one result per window of each scene, and per scene.

Windows are ``crop`` squares every ``stride`` pixels, the last row/column shifted inside the scene (TerraTorch's
edge rule), so every pixel is in a window; a scene smaller than a window is reflect-padded to one window, as the
tiled path pads it. Each window is read, preprocessed as training does, and batched through the model; only a
batch of windows is in memory. Results go to ``windows.csv`` (scene, window row/col/size and map bounds, valid
fraction, class + name + probabilities, or value) and ``scenes.csv`` (the mean over windows holding valid
pixels), and the same tables as Parquet when pyarrow is installed; each file appears only when complete.

Resumable and atomic, as the maps are: each scene's rows (and its summary) are written by whoever computed them to
``OUT/.parts/<scene>/scalar.json`` (aside, then renamed), and the tables are assembled from the parts of the call's
scenes in discovery order, windows in plan order; so 1 and N workers give the same bytes, a rerun skips scenes
whose part is done (``overwrite`` redoes them), and a killed worker or run costs only its unfinished scenes. The
parts are kept after the tables are written: they are the record a rerun skips by (each a few KB).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from encdec.predict.engine import PreprocessFn, invalid_mask
from encdec.predict.outputs import class_names_for, parts_dir
from encdec.predict.runner import ModelWorker
from encdec.predict.scenes import SceneInfo
from encdec.predict.windows import Tiling, reflect_index

__all__ = ["SCALAR_TASKS", "ScalarRunner", "ScalarWindow", "assemble_scalar_tables", "read_scalar_part",
           "scalar_done", "scalar_key", "scalar_windows", "write_scalar_tables"]

SCALAR_TASKS = ("classification", "scalar_regression")


@dataclass(frozen=True)
class ScalarWindow:
    """One window of a scene: its top-left pixel and size inside the scene (before padding)."""

    row: int
    col: int
    height: int
    width: int


def _starts(size: int, crop: int, stride: int) -> list[int]:
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop + 1, stride))
    if starts[-1] != size - crop:
        starts.append(size - crop)  # the last window shifted inside the scene, never dropped
    return starts


def scalar_windows(height: int, width: int, tiling: Tiling) -> list[ScalarWindow]:
    """The windows of a scene, row-major."""
    return [ScalarWindow(r, c, min(tiling.h_crop, height), min(tiling.w_crop, width))
            for r in _starts(height, tiling.h_crop, tiling.h_stride)
            for c in _starts(width, tiling.w_crop, tiling.w_stride)]


def _read(src: Any, scene: SceneInfo, w: ScalarWindow, tiling: Tiling) -> np.ndarray:
    """``[C, h_crop, w_crop]`` raw pixels of ``w``, reflect-padded when the scene is smaller than a window."""
    from rasterio.windows import Window

    raw = src.read(list(scene.bands_read), window=Window(w.col, w.row, w.width, w.height))
    if (w.height, w.width) == (tiling.h_crop, tiling.w_crop):
        return raw
    rows = reflect_index(np.arange(tiling.h_crop), w.height)
    cols = reflect_index(np.arange(tiling.w_crop), w.width)
    return raw[:, rows][:, :, cols]


def predict_scene_scalar(src: Any, scene: SceneInfo, tiling: Tiling, forward: Callable[[np.ndarray], np.ndarray],
                         preprocess: PreprocessFn, *, task: str, class_names: Sequence[str] | None,
                         on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """The per-window rows of one scene (see the module docstring for the columns)."""
    from rasterio.windows import Window, bounds

    rows: list[dict[str, Any]] = []
    windows = scalar_windows(scene.height, scene.width, tiling)
    for i in range(0, len(windows), tiling.batch_size):
        batch = windows[i: i + tiling.batch_size]
        raws = [_read(src, scene, w, tiling) for w in batch]
        x = np.stack([np.ascontiguousarray(preprocess(r), dtype=np.float32) for r in raws])
        y = forward(x)
        for w, raw, out in zip(batch, raws, y, strict=True):
            inside = raw[:, : w.height, : w.width]
            valid = 1.0 - float(invalid_mask(inside, scene.nodata).mean())
            left, bottom, right, top = bounds(Window(w.col, w.row, w.width, w.height), scene.transform)
            row: dict[str, Any] = {"scene": scene.path, "row": w.row, "col": w.col, "height": w.height,
                                   "width": w.width, "left": left, "bottom": bottom, "right": right, "top": top,
                                   "valid_fraction": valid}
            row.update(_result(out, task, class_names, valid > 0))
            rows.append(row)
        if on_batch is not None:
            on_batch(len(batch))
    return rows


def _result(out: np.ndarray, task: str, class_names: Sequence[str] | None, valid: bool) -> dict[str, Any]:
    """Class, its name and softmax probabilities (classification) or the value; empty for an all-nodata window."""
    if task == "scalar_regression":
        return {"value": float(out[0]) if valid else float("nan")}
    names = class_names_for(class_names, out.shape[0])
    e = np.exp(out - out.max())
    p = e / e.sum()
    cls = int(p.argmax())
    return {"class": cls if valid else None, "class_name": names[cls] if valid else None,
            **{f"p_{n}": (float(v) if valid else float("nan")) for n, v in zip(names, p, strict=True)}}


def scene_summary(rows: list[dict[str, Any]], task: str, class_names: Sequence[str] | None) -> dict[str, Any]:
    """One scene's result: the mean over its windows holding valid pixels (probabilities, or values)."""
    good = [r for r in rows if r["valid_fraction"] > 0]
    out: dict[str, Any] = {"scene": rows[0]["scene"], "windows": len(rows), "valid_windows": len(good)}
    if task == "scalar_regression":
        out["value"] = float(np.mean([r["value"] for r in good])) if good else float("nan")
        return out
    probs = [k for k in rows[0] if k.startswith("p_")]
    mean = np.array([np.mean([r[k] for r in good]) for k in probs]) if good else np.full(len(probs), np.nan)
    cls = int(np.nanargmax(mean)) if good else None
    names = [k[2:] for k in probs]
    out.update({"class": cls, "class_name": names[cls] if cls is not None else None,
                **{k: float(v) for k, v in zip(probs, mean, strict=True)}})
    return out


def _write_table(rows: list[dict[str, Any]], path: Path) -> list[Path]:
    """``path`` (CSV) and, with pyarrow, ``path`` as ``.parquet``; each written aside, then renamed."""
    written = []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(f".{path.name}.part")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    written.append(path)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    pq_path = path.with_suffix(".parquet")
    pq_tmp = pq_path.with_name(f".{pq_path.name}.part")
    pq.write_table(pa.Table.from_pylist(rows), pq_tmp)
    os.replace(pq_tmp, pq_path)
    return [*written, pq_path]


def write_scalar_tables(window_rows: list[dict[str, Any]], scene_rows: list[dict[str, Any]],
                        out_dir: Path) -> dict[str, Path]:
    """``windows.csv`` / ``scenes.csv`` (+ ``.parquet``) under ``out_dir``; returns the files written."""
    files: dict[str, Path] = {}
    for name, rows in (("windows", window_rows), ("scenes", scene_rows)):
        if rows:
            for p in _write_table(rows, out_dir / f"{name}.csv"):
                files[f"{name}{p.suffix}"] = p
    return files


def scalar_part(out_dir: Path, scene: SceneInfo) -> Path:
    """Where a scene's rows wait for the tables (and stay, as the record a rerun skips by)."""
    return parts_dir(out_dir, scene) / "scalar.json"


def scalar_key(task: str, class_names: Sequence[str] | None, tiling: Tiling) -> dict[str, Any]:
    """What a part's rows depend on besides the model and the scene: a part with another key is stale."""
    return {"task": task, "class_names": list(class_names or []), "tiling": tiling.as_tags()}


def read_scalar_part(out_dir: Path, scene: SceneInfo, key: dict[str, Any]) -> dict[str, Any] | None:
    """A scene's finished part (``{"key", "windows", "scene"}``), or ``None`` when there is none or it was made
    with other settings (``key``: task, classes, tiling), which makes it stale: the scene is then recomputed, as
    it is when the file is not a part we wrote (parts are renamed into place whole, so only an edit does that)."""
    path = scalar_part(out_dir, scene)
    try:
        part = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return part if isinstance(part, dict) and part.get("key") == key else None


def _write_part(out_dir: Path, scene: SceneInfo, part: dict[str, Any]) -> None:
    """JSON keeps ints, ``None`` and the shortest round-tripping repr of each float (NaN too): the tables written
    from a part are the bytes they would be from the rows in memory."""
    path = scalar_part(out_dir, scene)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer: a retried task never shares it
    tmp.write_text(json.dumps(part))
    os.replace(tmp, path)


@dataclass(kw_only=True)
class ScalarRunner(ModelWorker):
    """Runs scenes of a scalar task into their parts (see :class:`~encdec.predict.runner.ModelWorker` for the
    model and reading settings); what a Ray actor holds and what the in-process path uses, so 1 and N workers run
    the same code. ``tiled``: its ``crop``/``stride``/``batch_size`` are used.

    Attributes:
        task: ``classification`` or ``scalar_regression``.
        class_names: Class names (column names ``p_<name>``).
    """

    scalar_output: ClassVar[bool] = True

    task: str
    class_names: Sequence[str] | None = None

    @property
    def key(self) -> dict[str, Any]:
        return scalar_key(self.task, self.class_names, self.tiled)

    def done(self, scene: SceneInfo) -> bool:
        """Whether the scene's part is finished (with these settings)."""
        return scalar_done(self.out_dir, scene, self.key)

    def run(self, scene: SceneInfo, on_batch: Callable[[int], None] | None = None) -> int:
        """Predict ``scene`` into its part unless it is done; returns the windows computed (0 when done)."""
        if self.done(scene):
            return 0
        pre = self.preprocess_for(scene)
        forward = self.forward
        with self.open_pixels(scene) as src:
            rows = predict_scene_scalar(src, scene, self.tiled, forward, pre, task=self.task,
                                        class_names=self.class_names, on_batch=on_batch)
        _write_part(self.out_dir, scene, {"key": self.key, "windows": rows,
                                          "scene": scene_summary(rows, self.task, self.class_names)})
        return len(rows)


def scalar_done(out_dir: Path, scene: SceneInfo, key: dict[str, Any]) -> bool:
    """Whether ``scene``'s part under ``out_dir`` is finished with the settings ``key`` (:func:`scalar_key`)."""
    return read_scalar_part(out_dir, scene, key) is not None


def assemble_scalar_tables(out_dir: Path, scenes: Sequence[SceneInfo], key: dict[str, Any]) -> dict[str, Path]:
    """``windows``/``scenes`` tables from the finished parts of ``scenes``, in that order (scenes without one,
    the failed, are left out); nothing is written when no scene has a part."""
    window_rows: list[dict[str, Any]] = []
    scene_rows: list[dict[str, Any]] = []
    for scene in scenes:
        part = read_scalar_part(out_dir, scene, key)
        if part is not None:
            window_rows += part["windows"]
            scene_rows.append(part["scene"])
    return write_scalar_tables(window_rows, scene_rows, out_dir)
