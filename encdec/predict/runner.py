"""One worker's side of predict: the model as a batch function, and running strips of a scene to part files.

A :class:`StripRunner` is what a Ray actor holds (built once per worker) and what the in-process path uses: both
run the same code, so 1 and N workers write the same bytes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from encdec.config import DataSection
from encdec.predict.engine import ForwardFn, PreprocessFn, StripStats, run_strip
from encdec.predict.outputs import OutputSpec, StripWriter, strip_done
from encdec.predict.scenes import SceneInfo
from encdec.predict.windows import Tiling, WindowPlan, plan_windows

__all__ = ["ModelSource", "ModelWorker", "StripRunner", "make_forward", "make_preprocess"]

#: A ready ``nn.Module`` or a zero-argument callable that builds one (loaded once per worker).
ModelSource = Any
Precision = Literal["fp32", "bf16", "fp16"]


def make_forward(model: Any, *, device: str | None = None, precision: Precision = "fp32",
                 scalar: bool = False) -> ForwardFn:
    """``model`` as a numpy batch function: eval mode, no grad, autocast for bf16/fp16, float32 out.

    A model returning ``ModelOutput`` (ours) or a plain tensor (any ``nn.Module``) works. Pixel-wise models give
    ``[B, K, H, W]`` (or ``[B, H, W]``); with ``scalar`` (classification, scalar regression) ``[B, K]``, a ``[B]``
    output becoming ``[B, 1]``.
    """
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.eval().to(dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward(x: np.ndarray) -> np.ndarray:
        ctx = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            out = model(torch.from_numpy(x).to(dev, non_blocking=True))
        out = getattr(out, "output", out)
        if scalar:
            out = out[:, None] if out.ndim == 1 else out
            if out.ndim != 2:
                raise ValueError(f"a scalar task needs a model output [B, K] or [B]; got {tuple(out.shape)}. Fix: "
                                 f"predict pixel-wise models with task=segmentation or regression.")
        elif out.ndim not in (3, 4):
            raise ValueError(f"predict needs a pixel-wise model (output [B, K, H, W]); got output shape "
                             f"{tuple(out.shape)}. Fix: predict with a segmentation or regression model.")
        return out.float().cpu().numpy()

    return forward


def make_preprocess(means: Sequence[float] | None, stds: Sequence[float] | None, nodata: float | None, *,
                    data: DataSection | None = None, band_names: Sequence[str | None] = (),
                    path: str = "<array>") -> PreprocessFn:
    """Raw window (all the scene's bands, as read) -> model input.

    With ``data`` (a run's ``data:`` section, or an export's): exactly training's :func:`encdec.data.preprocess`
    (bands by name incl. ``dataset_bands``, ``constant_scale``, normalisation, ``no_data_replace``), so the scene
    must be read with all its bands. Without it, the bands as selected by the caller, ``(x - mean) / std`` with the
    same ``Normalizer`` (nodata -> 0), or a plain float32 cast (nodata -> 0) without means/stds.
    """
    if data is not None:
        from encdec.data.preprocess import preprocess as _shared

        names = tuple(band_names)

        def shared(raw: np.ndarray) -> np.ndarray:
            return _shared(raw, data, descriptions=names, nodata=nodata, path=path)[0]

        return shared
    from encdec.data.normalize import Normalizer
    from encdec.predict.engine import invalid_mask

    norm = Normalizer(means, stds) if means is not None and stds is not None else None

    def preprocess(raw: np.ndarray) -> np.ndarray:
        if norm is None:  # nodata -> 0 as the Normalizer does: a -9999 must not reach the model (scalar windows)
            x = raw.astype(np.float32)
            x[:, invalid_mask(raw, nodata)] = 0.0
            return x
        out = np.empty(raw.shape, np.float32)
        return norm(raw, out, invalid_mask(raw, nodata))

    return preprocess


@dataclass(kw_only=True)
class ModelWorker:
    """What a predict worker holds, for maps (:class:`StripRunner`) and scalar tasks (``ScalarRunner``) alike: the
    model (built on first use, once per worker), how scenes are preprocessed and read. Picklable before
    :attr:`forward` is first used (Ray ships it to each actor).

    Attributes:
        model: An ``nn.Module`` or a zero-argument callable returning one.
        tiled: Resolved tiling.
        out_dir: Output folder (parts go under ``.parts/``).
        preprocess: ``raw -> float32`` for every scene, or ``None``: :func:`make_preprocess` with ``means``/``stds``
            (or ``data``) and each scene's nodata.
        data: A ``data:`` section: preprocess as training does (:func:`make_preprocess`); scenes read whole.
        means: Per-band means (file units) for the default preprocessing.
        stds: Per-band standard deviations.
        device: Torch device (default cuda when available).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast).
        gdal_options: GDAL config options for reading the scenes (``AWS_S3_ENDPOINT``, ...), applied with
            ``rasterio.Env`` on each worker (its environment is not changed).
        gdal_cache_mb: GDAL block cache of the worker (MB).
    """

    scalar_output: ClassVar[bool] = False  # the model gives [B, K] (one result per window), not maps

    model: ModelSource
    tiled: Tiling
    out_dir: Path
    preprocess: PreprocessFn | None = None
    data: DataSection | None = None
    means: Sequence[float] | None = None
    stds: Sequence[float] | None = None
    device: str | None = None
    precision: Precision = "fp32"
    gdal_options: dict[str, str] = field(default_factory=dict)
    gdal_cache_mb: int = 256
    _forward: ForwardFn | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_forward": None}

    @property
    def forward(self) -> ForwardFn:
        if self._forward is None:
            import torch

            model = self.model if isinstance(self.model, torch.nn.Module) else self.model()
            self._forward = make_forward(model, device=self.device, precision=self.precision,
                                         scalar=self.scalar_output)
        return self._forward

    @contextlib.contextmanager
    def open_pixels(self, scene: SceneInfo) -> Iterator[Any]:
        """The scene's pixels under the worker's GDAL options. GDAL's block cache defaults to 5 % of RAM and would
        grow with the scene's width; it is bounded to ``gdal_cache_mb``."""
        from encdec.predict.rasters import gdal_env, open_raster

        with gdal_env(self.gdal_options, GDAL_CACHEMAX=self.gdal_cache_mb), open_raster(scene.path) as src:
            yield src

    def preprocess_for(self, scene: SceneInfo) -> PreprocessFn:
        """The raw-window -> model-input function for ``scene`` (its nodata and band names)."""
        return self.preprocess or make_preprocess(self.means, self.stds, scene.nodata, data=self.data,
                                                  band_names=scene.band_names, path=scene.path)


@dataclass(kw_only=True)
class StripRunner(ModelWorker):
    """Runs strips of scenes into map parts (see :class:`ModelWorker` for the model and reading settings).

    Attributes:
        spec: Outputs to write.
        strip_rows: Output rows per strip (the plan's unit of work).
        queue_windows: Windows read ahead of the forward pass.
        read_threads: Reader threads per strip (see :func:`~encdec.predict.engine.run_strip`); ``None``: one on
            CPU (more would take the forward's cores), up to 8 when the model runs on an accelerator (one reader
            streamed 157 windows/s of 6 x 224² on an H200 that forwards 1152/s).
        read_cache_mb: Decoded block rows kept per reader, so that GDAL decodes each block once (scenes too wide
            for it are read window row by window row).
    """

    spec: OutputSpec
    strip_rows: int = 2048
    queue_windows: int = 32
    read_threads: int | None = None
    read_cache_mb: int = 128

    def plan(self, scene: SceneInfo) -> WindowPlan:
        return plan_windows(scene.height, scene.width, self.tiled, strip_rows=self.strip_rows)

    def run(self, scene: SceneInfo, strip_indexes: Sequence[int] | None = None,
            on_batch: Callable[[int], None] | None = None) -> StripStats:
        """Predict the given strips of ``scene`` (default: all not yet done) into part files."""
        from encdec.predict.rasters import gdal_env, open_raster

        plan = self.plan(scene)
        todo = [plan.strips[i] for i in strip_indexes] if strip_indexes is not None else list(plan.strips)
        todo = [s for s in todo if not strip_done(self.out_dir, scene, s)]
        total = StripStats()
        if not todo:
            return total
        pre = self.preprocess_for(scene)
        forward = self.forward
        threads = self.read_threads or self._default_read_threads()

        @contextlib.contextmanager
        def open_src() -> Iterator[Any]:
            with gdal_env(self.gdal_options), open_raster(scene.path) as handle:
                yield handle

        t0 = time.perf_counter()
        with self.open_pixels(scene) as src:
            for strip in todo:
                writer = StripWriter(self.out_dir, scene, strip, self.spec)
                ok = False
                try:
                    st = run_strip(src, scene, plan, strip, forward, pre, writer,
                                   queue_windows=self.queue_windows, on_batch=on_batch,
                                   read_threads=threads, open_src=open_src, read_cache_mb=self.read_cache_mb)
                    ok = True
                finally:
                    writer.close(ok)
                total.windows += st.windows
                total.batches += st.batches
                total.forward_s += st.forward_s
        total.wall_s = time.perf_counter() - t0
        return total

    def _default_read_threads(self) -> int:
        import os

        import torch

        dev = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 1 if dev.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 2))
