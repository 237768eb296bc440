"""One worker's side of predict: the model as a batch function, and running strips of a scene to part files.

A :class:`StripRunner` is what a Ray actor holds (built once per worker) and what the in-process path uses: both
run the same code, so 1 and N workers write the same bytes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from encdec.config import DataSection
from encdec.predict.engine import ForwardFn, PreprocessFn, StripStats, run_strip
from encdec.predict.outputs import OutputSpec, StripWriter, strip_done
from encdec.predict.scenes import SceneInfo
from encdec.predict.windows import Tiling, WindowPlan, plan_windows

__all__ = ["ModelSource", "StripRunner", "make_forward", "make_preprocess"]

#: A ready ``nn.Module`` or a zero-argument callable that builds one (loaded once per worker).
ModelSource = Any
Precision = Literal["fp32", "bf16", "fp16"]


def make_forward(model: Any, *, device: str | None = None, precision: Precision = "fp32") -> ForwardFn:
    """``model`` as a numpy batch function: eval mode, no grad, autocast for bf16/fp16, float32 out.

    A model returning ``ModelOutput`` (ours) or a plain tensor (any ``nn.Module``) works.
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
        if out.ndim not in (3, 4):
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
    same ``Normalizer`` (nodata -> 0), or a plain float32 cast without means/stds.
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
        if norm is None:
            return raw.astype(np.float32)
        out = np.empty(raw.shape, np.float32)
        return norm(raw, out, invalid_mask(raw, nodata))

    return preprocess


@dataclass
class StripRunner:
    """Runs strips of scenes with one model. Picklable before :meth:`forward` is first used (Ray actors).

    Attributes:
        model: An ``nn.Module`` or a zero-argument callable returning one.
        tiled: Resolved tiling.
        spec: Outputs to write.
        out_dir: Output folder (parts go under ``.parts/``).
        preprocess: ``raw -> float32`` for every scene, or ``None``: :func:`make_preprocess` with ``means``/``stds``
            and each scene's nodata.
        data: A ``data:`` section: preprocess as training does (:func:`make_preprocess`); scenes read whole.
        means: Per-band means (file units) for the default preprocessing.
        stds: Per-band standard deviations.
        device: Torch device (default cuda when available).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast).
        strip_rows: Output rows per strip (the plan's unit of work).
        queue_windows: Windows read ahead of the forward pass.
        gdal_cache_mb: GDAL block cache of the worker (MB).
    """

    model: ModelSource
    tiled: Tiling
    spec: OutputSpec
    out_dir: Path
    preprocess: PreprocessFn | None = None
    data: DataSection | None = None
    means: Sequence[float] | None = None
    stds: Sequence[float] | None = None
    device: str | None = None
    precision: Precision = "fp32"
    strip_rows: int = 2048
    queue_windows: int = 32
    gdal_cache_mb: int = 256
    _forward: ForwardFn | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_forward": None}

    @property
    def forward(self) -> ForwardFn:
        if self._forward is None:
            import torch

            model = self.model if isinstance(self.model, torch.nn.Module) else self.model()
            self._forward = make_forward(model, device=self.device, precision=self.precision)
        return self._forward

    def plan(self, scene: SceneInfo) -> WindowPlan:
        return plan_windows(scene.height, scene.width, self.tiled, strip_rows=self.strip_rows)

    def run(self, scene: SceneInfo, strip_indexes: Sequence[int] | None = None,
            on_batch: Callable[[int], None] | None = None) -> StripStats:
        """Predict the given strips of ``scene`` (default: all not yet done) into part files."""
        import rasterio

        plan = self.plan(scene)
        todo = [plan.strips[i] for i in strip_indexes] if strip_indexes is not None else list(plan.strips)
        todo = [s for s in todo if not strip_done(self.out_dir, scene, s)]
        pre = self.preprocess or make_preprocess(self.means, self.stds, scene.nodata, data=self.data,
                                                 band_names=scene.band_names, path=scene.path)
        total = StripStats()
        if not todo:
            return total
        forward = self.forward
        t0 = time.perf_counter()
        # GDAL's block cache defaults to 5 % of RAM and would grow with the scene's width; one block row of a wide
        # scene is what re-reading overlapping window rows needs.
        with rasterio.Env(GDAL_CACHEMAX=self.gdal_cache_mb), rasterio.open(scene.path) as src:
            for strip in todo:
                writer = StripWriter(self.out_dir, scene, strip, self.spec)
                ok = False
                try:
                    st = run_strip(src, scene, plan, strip, forward, pre, writer,
                                   queue_windows=self.queue_windows, on_batch=on_batch)
                    ok = True
                finally:
                    writer.close(ok)
                total.windows += st.windows
                total.batches += st.batches
                total.forward_s += st.forward_s
        total.wall_s = time.perf_counter() - t0
        return total
