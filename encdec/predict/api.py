"""``encdec.predict(model, scenes, out_dir, ...)``: tiled inference over scenes of any size, in this process or on
Ray workers; the CLI (``encdec-launch predict``) calls it.

Work is split into (scene, row strip) tasks from the window plan alone, so the outputs do not depend on how many
workers run them. Finished scenes are skipped (``overwrite=False``); strips already written by an interrupted run
are reused; bad scenes are listed and skipped while the others are written.
"""

from __future__ import annotations

import hashlib
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
from encdec.predict.scalar import SCALAR_TASKS, ScalarRunner
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
    tables: dict[str, Path] = field(default_factory=dict)  # scalar tasks: windows/scenes .csv (+ .parquet)

    @property
    def windows_per_s(self) -> float:
        """Window forwards per second over the whole call."""
        return self.windows / self.seconds if self.seconds > 0 else 0.0


def plan_predict(scenes: Sequence[str | Path], out_dir: str | Path, *, tiled: TiledParams, spec: OutputSpec,
                 bands: Sequence[int | str] | None = None, expect_bands: int | None = None,
                 strip_rows: int = 2048, require_crs: bool = True, num_frames: int | None = None,
                 gdal_options: Mapping[str, str] | None = None) -> tuple[list[ScenePlan], dict[str, str]]:
    """Find and check scenes and plan their windows; no model, no cluster. Returns (plans, bad scenes).

    ``num_frames`` (the model's): a scene given as one file per date must have that many files.
    """
    from encdec.predict.rasters import gdal_env

    paths = discover_scenes(scenes)
    out = Path(out_dir)
    t = tiled.resolve()
    plans: list[ScenePlan] = []
    bad: dict[str, str] = {}
    names: dict[str, str] = {}
    for p in paths:
        try:
            with gdal_env(gdal_options):
                info = open_scene(p, bands=bands, expect_bands=expect_bands, require_crs=require_crs)
        except SceneError as e:
            bad[p] = str(e)
            continue
        if num_frames is not None and info.frames > 1 and info.frames != num_frames:
            bad[p] = (f"{p}: {info.frames} files (dates), the model takes data.num_frames={num_frames}. Fix: give "
                      f"{num_frames} files separated by '|', or one file holding the dates as band groups.")
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


def _predict_scalar(runner: ScalarRunner, todo: list[ScenePlan], result: PredictResult, *, workers: int,
                    cpus_per_worker: float, gpus_per_worker: float | None, on_ray: bool, progress: bool) -> None:
    """Scalar tasks: each scene's rows to its part (here or on Ray actors), skipping finished parts, then the
    per-window and per-scene tables from the parts in scene order (:mod:`encdec.predict.scalar`)."""
    from encdec.predict.scalar import assemble_scalar_tables, scalar_windows

    pending: list[ScenePlan] = []
    for sp in todo:
        if runner.done(sp.scene):
            result.skipped_done.append(sp.scene.path)
        else:
            pending.append(sp)
    t = runner.tiled
    bar = _Progress(sum(len(scalar_windows(sp.scene.height, sp.scene.width, t)) for sp in pending), len(pending),
                    progress)
    if not on_ray:
        for sp in pending:
            try:
                result.windows += runner.run(sp.scene, on_batch=bar.windows)
                bar.scene()
            except Exception as e:  # a failed scene is listed (CLI exit 4); the others are written
                result.failed[sp.scene.path] = f"{type(e).__name__}: {e}"
    else:
        from encdec.predict.ray_workers import run_scalar_on_ray

        run_scalar_on_ray(runner, [sp.scene for sp in pending], workers=workers, cpus_per_worker=cpus_per_worker,
                          gpus_per_worker=gpus_per_worker, result=result, on_scene_done=bar.scene, on_windows=bar.windows)
    # the tables appear only now, complete, in the order the scenes were found: the same bytes for any workers
    result.tables = assemble_scalar_tables(runner.out_dir, [sp.scene for sp in todo], runner.key)
    for sp in todo:
        if sp.scene.path not in result.failed:
            result.outputs[sp.scene.path] = dict(result.tables)
    if progress:
        print(file=sys.stderr)


def predict(model: ModelSource, scenes: Sequence[str | Path] | str | Path, out_dir: str | Path, *,
            task: Literal["segmentation", "regression", "classification", "scalar_regression"] = "segmentation",
            tiled: TiledParams | Mapping[str, Any] | None = None,
            preprocess: PreprocessFn | None = None, data: DataSection | None = None,
            means: Sequence[float] | None = None, stds: Sequence[float] | None = None, bands: Sequence[int | str] | None = None,
            expect_bands: int | None = None, class_names: Sequence[str] | None = None,
            probabilities: Literal["uint8", "float16"] | bool | None = None, overwrite: bool = False,
            precision: Precision = "fp32", device: str | None = None, workers: int = 1,
            cpus_per_worker: float = 1.0, strip_rows: int = 2048, queue_windows: int = 32, quicklook: bool = True,
            tags: Mapping[str, str] | None = None, require_crs: bool = True, progress: bool = False,
            gdal_options: Mapping[str, str] | None = None, read_threads: int | None = None,
            on_ray: bool | None = None, gpus_per_worker: float | None = None) -> PredictResult:
    """Predict every scene into georeferenced COGs under ``out_dir``.

    Args:
        model: An ``nn.Module`` (pixel-wise: ``[B, C, H, W] -> [B, K, H, W]`` or ``ModelOutput``) or a zero-argument
            callable that builds one on each worker.
        scenes: Files, folders, globs, manifests or GDAL remote paths (see ``discover_scenes``).
        out_dir: Output folder: ``<scene>.tif`` (+ ``_probabilities.tif``, ``.png``) per scene.
        task: ``segmentation`` (uint8 class ids, nodata 255) or ``regression`` (float32, nodata NaN) maps; or
            ``classification`` / ``scalar_regression`` (a model ``[B, C, H, W] -> [B, K]``): one result per
            window (``crop``/``stride``, no blending) and per scene in ``windows.csv`` / ``scenes.csv`` (+ Parquet
            with pyarrow), see :mod:`encdec.predict.scalar`; scenes spread over workers, resumable as maps are.
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
        workers: 1: this process (unless ``on_ray``); more: that many Ray actors (on the Ray cluster this process
            is connected to, else a local one started by ``ray.init``).
        cpus_per_worker: Ray CPUs (and torch threads) per worker.
        strip_rows: Output rows per unit of work (resume granularity; a scalar task's unit is the scene).
        queue_windows: Windows read ahead of the forward pass per worker.
        quicklook: Write a PNG quicklook per scene.
        tags: Extra GeoTIFF tags (model name, recipe hash, ...).
        require_crs: Refuse scenes without a CRS.
        progress: Print a progress line on stderr.
        gdal_options: GDAL config options for reading scenes, e.g. ``AWS_S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``,
            ``AWS_SECRET_ACCESS_KEY``, ``AWS_HTTPS=NO``, ``AWS_VIRTUAL_HOSTING=FALSE`` for an S3-compatible server;
            applied with ``rasterio.Env`` around every read (here and on Ray workers), never set in ``os.environ``.
        read_threads: Reader threads per worker (default: 1 on CPU, up to 8 with an accelerator).
        on_ray: Run the workers as Ray actors (default: when ``workers > 1``); ``True`` with one worker puts the
            model on the cluster this process is connected to (``--address``) instead of in this process.
        gpus_per_worker: GPUs each Ray worker asks for (default: 1 when the cluster has GPUs and ``device`` is
            unset or CUDA, else 0).
    """
    if data is not None and (bands is not None or means is not None or stds is not None or preprocess is not None):
        raise ValueError("predict(data=...) selects bands and normalises as training does; leave bands, means, "
                         "stds and preprocess unset")
    t0 = time.perf_counter()
    use_ray = workers > 1 if on_ray is None else on_ray
    params = tiled if isinstance(tiled, TiledParams) else TiledParams(**(tiled or {}))
    prob = "uint8" if probabilities is True else (probabilities or None)
    scalar = task in SCALAR_TASKS  # tables, not maps: the map spec below only names (unused) paths
    spec = OutputSpec(task="regression" if scalar else task,  # type: ignore[arg-type]
                      class_names=tuple(class_names) if class_names else None, probabilities=prob,
                      quicklook=quicklook and not scalar)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans, bad = plan_predict([scenes] if isinstance(scenes, (str, Path)) else scenes, out, tiled=params, spec=spec,
                              bands=bands, expect_bands=expect_bands, strip_rows=strip_rows, require_crs=require_crs,
                              num_frames=data.num_frames if data is not None else None, gdal_options=gdal_options)
    result = PredictResult(failed=dict(bad))
    todo: list[ScenePlan] = []
    for sp in plans:
        if sp.done and not overwrite and not scalar:
            result.skipped_done.append(sp.scene.path)
            result.outputs[sp.scene.path] = sp.outputs
        else:
            if overwrite:
                shutil.rmtree(parts_dir(out, sp.scene), ignore_errors=True)
            todo.append(sp)
    t = params.resolve()
    worker: dict[str, Any] = {"model": model, "tiled": t, "out_dir": out, "preprocess": preprocess, "data": data,
                              "means": means, "stds": stds, "device": device, "precision": precision,
                              "gdal_options": dict(gdal_options or {})}  # what every worker holds (ModelWorker)
    if scalar:
        scalar_runner = ScalarRunner(**worker, task=task, class_names=class_names)
        _predict_scalar(scalar_runner, todo, result, workers=workers, cpus_per_worker=cpus_per_worker,
                        gpus_per_worker=gpus_per_worker, on_ray=use_ray, progress=progress)
        result.seconds = time.perf_counter() - t0
        return result
    # class_names are tagged by assemble_scene (given names, else "class i" for each of the model's channels)
    all_tags = {"encdec_version": __version__, "model": _model_tag(model), "task": task, **t.as_tags(),
                **(tags or {})}
    runner = StripRunner(**worker, spec=spec, strip_rows=strip_rows, queue_windows=queue_windows,
                         read_threads=read_threads)
    bar = _Progress(sum(sp.plan.n_computed for sp in todo), len(todo), progress)

    def finish(sp: ScenePlan) -> None:
        scene_tags = {**all_tags, "source": sp.scene.path,
                      "source_sha": hashlib.sha256(sp.scene.path.encode()).hexdigest()[:16]}
        import rasterio

        with rasterio.Env(GDAL_CACHEMAX=256):  # the COG copy streams blocks; a bounded cache keeps RSS flat
            result.outputs[sp.scene.path] = assemble_scene(out, sp.scene, sp.plan.strips, spec, scene_tags)
        bar.scene()

    if not use_ray:
        for sp in todo:
            try:
                stats = runner.run(sp.scene, on_batch=bar.windows)
                result.windows += stats.windows
                finish(sp)
            except Exception as e:  # a failed scene is listed (CLI exit 4); the others are written
                result.failed[sp.scene.path] = f"{type(e).__name__}: {e}"
    else:
        from encdec.predict.ray_workers import run_on_ray

        run_on_ray(runner, todo, workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                   result=result,
                   on_scene_done=finish, on_windows=bar.windows)
    if progress:
        print(file=sys.stderr)
    result.seconds = time.perf_counter() - t0
    return result
