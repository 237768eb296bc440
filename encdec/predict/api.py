"""``encdec.predict(model, scenes, out_dir, ...)``: tiled inference over scenes of any size, in this process or on
Ray workers; the CLI (``encdec-launch predict``) calls it.

Work is split into (scene, row strip) tasks from the window plan alone, so the outputs do not depend on how many
workers run them. Finished scenes are skipped (``overwrite=False``); strips already written by an interrupted run
are reused; bad scenes are listed and skipped while the others are written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from encdec._version import __version__
from encdec.config import DataSection
from encdec.predict.engine import PreprocessFn
from encdec.predict.outputs import OutputSpec, assemble_scene, outputs_of, parts_dir, scene_done
from encdec.predict.runner import ModelSource, Precision, StripRunner
from encdec.predict.scenes import SceneError, SceneInfo, discover_scenes, open_scene
from encdec.predict.windows import TiledParams, WindowPlan, plan_windows

__all__ = ["PredictResult", "ScenePlan", "plan_predict", "predict"]


@dataclass(frozen=True)
class ScenePlan:
    """A scene, its window plan and its output paths (what ``--dry-run`` prints)."""

    scene: SceneInfo
    plan: WindowPlan
    outputs: dict[str, Path]
    done: bool

    def output_bytes(self, k: int, spec: OutputSpec) -> int:
        """Uncompressed size of the scene's raster outputs for ``k`` output channels."""
        import numpy as np

        px = self.scene.height * self.scene.width
        return sum(px * n * np.dtype(dt).itemsize for dt, n, _, _ in spec.products(k).values())


@dataclass
class PredictResult:
    """What a predict call did."""

    outputs: dict[str, dict[str, Path]] = field(default_factory=dict)
    skipped_done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    windows: int = 0
    seconds: float = 0.0

    @property
    def windows_per_s(self) -> float:
        """Window forwards per second over the whole call."""
        return self.windows / self.seconds if self.seconds > 0 else 0.0


def plan_predict(scenes: Sequence[str | Path], out_dir: str | Path, *, tiled: TiledParams, spec: OutputSpec,
                 bands: Sequence[int | str] | None = None, expect_bands: int | None = None,
                 strip_rows: int = 2048, require_crs: bool = True) -> tuple[list[ScenePlan], dict[str, str]]:
    """Find and check scenes and plan their windows; no model, no cluster. Returns (plans, bad scenes)."""
    paths = discover_scenes(scenes)
    out = Path(out_dir)
    t = tiled.resolve()
    plans: list[ScenePlan] = []
    bad: dict[str, str] = {}
    names: dict[str, str] = {}
    for p in paths:
        try:
            info = open_scene(p, bands=bands, expect_bands=expect_bands, require_crs=require_crs)
        except SceneError as e:
            bad[p] = str(e)
            continue
        if info.name in names:
            bad[p] = (f"{p}: same output name {info.name!r} as {names[info.name]}. Fix: predict them into "
                      f"different output folders.")
            continue
        names[info.name] = p
        plan = plan_windows(info.height, info.width, t, strip_rows=strip_rows)
        plans.append(ScenePlan(info, plan, outputs_of(out, info, spec), scene_done(out, info, spec)))
    return plans, bad


def worker_memory_bytes(plan: ScenePlan, k: int, *, queue_windows: int, model_bytes: int = 0) -> int:
    """Rough peak memory of one worker on this scene, beyond the Python/torch runtime: model weights, one padded
    window row of input, the window queue, a batch, the accumulator (``crop - 2*delta`` rows) and output rows."""
    t, s = plan.plan.tiling, plan.scene
    c = len(s.bands_read)
    wp = max(s.width, t.out_w) + 2 * t.delta
    row_in = c * t.h_crop * wp * (8 + 4)  # file dtype (<= 8 B) read + reflect-mapped copy
    window = c * t.h_crop * t.w_crop * 4
    batch = t.batch_size * (window + k * t.h_crop * t.w_crop * 4)
    acc = t.out_h * wp * (4 * k + 4 + 1 + (0 if t.average_patches else 8))
    rows_out = t.out_h * s.width * 4 * k * 3
    return model_bytes + row_in + (queue_windows + t.batch_size) * window + batch + acc + rows_out


def _model_tag(model: ModelSource) -> str:
    name = getattr(model, "name", None) or type(model).__name__
    return str(name)


class _Progress:
    """One status line on stderr: windows/s, scenes done, ETA (at most every 2 s)."""

    def __init__(self, total_windows: int, total_scenes: int, enabled: bool) -> None:
        self.total, self.scenes, self.enabled = total_windows, total_scenes, enabled
        self.done = self.scenes_done = 0
        self.t0 = self.last = time.perf_counter()

    def windows(self, n: int) -> None:
        self.done += n
        self._show()

    def scene(self) -> None:
        self.scenes_done += 1
        self._show(force=True)

    def _show(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 2.0):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"\rpredict: {self.done}/{self.total} windows, {rate:.1f} windows/s, scenes {self.scenes_done}/"
              f"{self.scenes}, ETA {eta:.0f} s   ", end="", file=sys.stderr, flush=True)


def predict(model: ModelSource, scenes: Sequence[str | Path] | str | Path, out_dir: str | Path, *,
            task: Literal["segmentation", "regression"] = "segmentation",
            tiled: TiledParams | Mapping[str, Any] | None = None,
            preprocess: PreprocessFn | None = None, data: DataSection | None = None,
            means: Sequence[float] | None = None, stds: Sequence[float] | None = None, bands: Sequence[int | str] | None = None,
            expect_bands: int | None = None, class_names: Sequence[str] | None = None,
            probabilities: Literal["uint8", "float16"] | bool | None = None, overwrite: bool = False,
            precision: Precision = "fp32", device: str | None = None, workers: int = 1,
            cpus_per_worker: float = 1.0, strip_rows: int = 2048, queue_windows: int = 32, quicklook: bool = True,
            tags: Mapping[str, str] | None = None, require_crs: bool = True, progress: bool = False) -> PredictResult:
    """Predict every scene into georeferenced COGs under ``out_dir``.

    Args:
        model: An ``nn.Module`` (pixel-wise: ``[B, C, H, W] -> [B, K, H, W]`` or ``ModelOutput``) or a zero-argument
            callable that builds one on each worker.
        scenes: Files, folders, globs, manifests or GDAL remote paths (see ``discover_scenes``).
        out_dir: Output folder: ``<scene>.tif`` (+ ``_probabilities.tif``, ``.png``) per scene.
        task: ``segmentation`` (uint8 class ids, nodata 255) or ``regression`` (float32, nodata NaN).
        tiled: TerraTorch tiled-inference parameters (crop, stride, delta, average_patches, blend_overlaps,
            batch_size, ...).
        preprocess: ``raw window [C, h, w] -> float32`` (band selection is done by ``bands``); default:
            ``(x - means) / stds`` with nodata set to 0.
        data: A run's (or export's) ``data:`` section: scenes are preprocessed exactly as training tiles are
            (:func:`encdec.data.preprocess`: band selection by name, ``constant_scale``, normalisation, nodata);
            then ``bands``/``means``/``stds`` must be left unset.
        means: Per-band means for the default preprocessing.
        stds: Per-band standard deviations for the default preprocessing.
        bands: Bands to read in the model's order (1-based indexes or band names); default all.
        expect_bands: The model's band count (scenes with another count are refused).
        class_names: Class names (tags, legend).
        probabilities: Also write per-class probabilities (``uint8`` x254, or ``float16`` values; ``True`` = uint8).
        overwrite: Redo scenes whose outputs exist.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast.
        device: Torch device (default cuda when available).
        workers: 1: this process; more: that many Ray actors (on the Ray cluster this process is connected to,
            else a local one started by ``ray.init``).
        cpus_per_worker: Ray CPUs (and torch threads) per worker.
        strip_rows: Output rows per unit of work (resume granularity).
        queue_windows: Windows read ahead of the forward pass per worker.
        quicklook: Write a PNG quicklook per scene.
        tags: Extra GeoTIFF tags (model name, recipe hash, ...).
        require_crs: Refuse scenes without a CRS.
        progress: Print a progress line on stderr.
    """
    if data is not None and (bands is not None or means is not None or stds is not None or preprocess is not None):
        raise ValueError("predict(data=...) selects bands and normalises as training does; leave bands, means, "
                         "stds and preprocess unset")
    t0 = time.perf_counter()
    params = tiled if isinstance(tiled, TiledParams) else TiledParams(**(tiled or {}))
    prob = "uint8" if probabilities is True else (probabilities or None)
    spec = OutputSpec(task=task, class_names=tuple(class_names) if class_names else None, probabilities=prob,
                      quicklook=quicklook)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans, bad = plan_predict([scenes] if isinstance(scenes, (str, Path)) else scenes, out, tiled=params, spec=spec,
                              bands=bands, expect_bands=expect_bands, strip_rows=strip_rows, require_crs=require_crs)
    result = PredictResult(failed=dict(bad))
    todo: list[ScenePlan] = []
    for sp in plans:
        if sp.done and not overwrite:
            result.skipped_done.append(sp.scene.path)
            result.outputs[sp.scene.path] = sp.outputs
        else:
            if overwrite:
                shutil.rmtree(parts_dir(out, sp.scene), ignore_errors=True)
            todo.append(sp)
    t = params.resolve()
    all_tags = {"encdec_version": __version__, "model": _model_tag(model), "task": task,
                "class_names": json.dumps(list(class_names or [])), **t.as_tags(), **(tags or {})}
    runner = StripRunner(model, t, spec, out, preprocess=preprocess, data=data, means=means, stds=stds,
                         device=device, precision=precision, strip_rows=strip_rows, queue_windows=queue_windows)
    bar = _Progress(sum(sp.plan.n_computed for sp in todo), len(todo), progress)

    def finish(sp: ScenePlan) -> None:
        scene_tags = {**all_tags, "source": sp.scene.path,
                      "source_sha": hashlib.sha256(sp.scene.path.encode()).hexdigest()[:16]}
        import rasterio

        with rasterio.Env(GDAL_CACHEMAX=256):  # the COG copy streams blocks; a bounded cache keeps RSS flat
            result.outputs[sp.scene.path] = assemble_scene(out, sp.scene, sp.plan.strips, spec, scene_tags)
        bar.scene()

    if workers <= 1:
        for sp in todo:
            try:
                stats = runner.run(sp.scene, on_batch=bar.windows)
                result.windows += stats.windows
                finish(sp)
            except Exception as e:  # a failed scene is listed (CLI exit 4); the others are written
                result.failed[sp.scene.path] = f"{type(e).__name__}: {e}"
    else:
        from encdec.predict.ray_workers import run_on_ray

        run_on_ray(runner, todo, workers=workers, cpus_per_worker=cpus_per_worker, result=result,
                   on_scene_done=finish, on_windows=bar.windows)
    if progress:
        print(file=sys.stderr)
    result.seconds = time.perf_counter() - t0
    return result
