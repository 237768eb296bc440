"""Output products of a scene, written by row strips and assembled into tiled, compressed COGs atomically.

* Each strip is written by its owner to ``OUT/.parts/<scene>/strip_NNNNN.<product>.tif`` (renamed into place when
  complete, then a ``.done`` marker): a killed worker costs only its unfinished strips.
* When every strip of a scene is done, the parts are copied (row blocks, never the whole scene) into a tiled GeoTIFF
  with the scene's CRS, transform and size, converted to a COG with overviews and tags next to the final name, and
  renamed into place: an output exists only when complete. Finished scenes are skipped on rerun.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from encdec.predict.scenes import SceneInfo
from encdec.predict.windows import Strip

__all__ = ["OutputSpec", "StripWriter", "assemble_scene", "class_names_for", "outputs_of", "remove_empty_parts",
           "scene_done", "strip_done"]

CLASS_NODATA = 255
PROB_UINT8_SCALE = 254  # uint8 probabilities are round(p * 254); 255 is nodata


@dataclass(frozen=True)
class OutputSpec:
    """What to write for each scene.

    Attributes:
        task: ``segmentation`` (class ids, uint8, nodata 255) or ``regression`` (float32, nodata NaN).
        class_names: Names of the classes (tags, legend, probability band descriptions).
        probabilities: Also write per-class probabilities: ``uint8`` (p x 254, nodata 255) or ``float16`` (NaN).
        quicklook: Write a PNG quicklook with a legend next to each output.
    """

    task: Literal["segmentation", "regression"] = "segmentation"
    class_names: tuple[str, ...] | None = None
    probabilities: Literal["uint8", "float16"] | None = None
    quicklook: bool = True

    def names(self, k: int) -> tuple[str, ...]:
        """The ``k`` class names: the model's (``model.yaml``'s ``class_names``), else ``class 0``, ``class 1``..."""
        return class_names_for(self.class_names, k)

    def products(self, k: int) -> dict[str, tuple[str, int, float, str]]:
        """``name -> (dtype, bands, nodata, overview resampling)`` for a model with ``k`` output channels."""
        if self.task == "regression":
            return {"pred": ("float32", 1, float("nan"), "average")}
        out: dict[str, tuple[str, int, float, str]] = {"pred": ("uint8", 1, CLASS_NODATA, "nearest")}
        if self.probabilities == "uint8":
            out["prob"] = ("uint8", k, CLASS_NODATA, "average")
        elif self.probabilities == "float16":
            out["prob"] = ("float32", k, float("nan"), "average")  # GeoTIFF has no float16 for GDAL < 3.11
        return out

    def compute(self, values: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        """Blended model outputs ``[K, n, W]`` -> product arrays (nodata where ``valid`` is False)."""
        invalid = ~valid
        if self.task == "regression":
            pred = values[0].astype(np.float32)
            pred[invalid] = np.nan
            return {"pred": pred[None]}
        cls = values.argmax(axis=0).astype(np.uint8)
        cls[invalid] = CLASS_NODATA
        out = {"pred": cls[None]}
        if self.probabilities:
            e = np.exp(values - values.max(axis=0, keepdims=True))
            p = e / e.sum(axis=0, keepdims=True)
            if self.probabilities == "uint8":
                q = np.rint(p * PROB_UINT8_SCALE).astype(np.uint8)
                q[:, invalid] = CLASS_NODATA
            else:
                q = p.astype(np.float16).astype(np.float32)
                q[:, invalid] = np.nan
            out["prob"] = q
        return out


def class_names_for(class_names: Sequence[str] | None, k: int) -> tuple[str, ...]:
    """``k`` class names: the given ones first, then ``class i`` for the channels they do not name."""
    given = tuple(class_names or ())[:k]
    return given + tuple(f"class {i}" for i in range(len(given), k))


def outputs_of(out_dir: Path, scene: SceneInfo, spec: OutputSpec) -> dict[str, Path]:
    """Final paths of a scene's outputs (``pred``, optionally ``prob`` and ``png``)."""
    paths = {"pred": out_dir / f"{scene.name}.tif"}
    if spec.task == "segmentation" and spec.probabilities:
        paths["prob"] = out_dir / f"{scene.name}_probabilities.tif"
    if spec.quicklook:
        paths["png"] = out_dir / f"{scene.name}.png"
    return paths


def scene_done(out_dir: Path, scene: SceneInfo, spec: OutputSpec) -> bool:
    """Whether every output of the scene exists (each appears only when complete)."""
    return all(p.exists() for p in outputs_of(out_dir, scene, spec).values())


def parts_dir(out_dir: Path, scene: SceneInfo) -> Path:
    """Where a scene's strip parts live until it is assembled."""
    return out_dir / ".parts" / scene.name


def strip_done(out_dir: Path, scene: SceneInfo, strip: Strip) -> bool:
    """Whether a strip's parts are complete."""
    return (parts_dir(out_dir, scene) / f"strip_{strip.index:05d}.done").exists()


class StripWriter:
    """Writes one strip's product rows to part files, renamed into place by :meth:`close`."""

    def __init__(self, out_dir: Path, scene: SceneInfo, strip: Strip, spec: OutputSpec) -> None:
        self.dir = parts_dir(out_dir, scene)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.scene, self.strip, self.spec = scene, strip, spec
        self.files: dict[str, Any] = {}

    def _path(self, product: str) -> Path:
        return self.dir / f"strip_{self.strip.index:05d}.{product}.tif"

    def __call__(self, row: int, values: np.ndarray, valid: np.ndarray) -> None:
        import rasterio
        from rasterio.windows import Window

        arrays = self.spec.compute(values, valid)
        for name, arr in arrays.items():
            if name not in self.files:
                dtype, bands, nodata, _ = self.spec.products(values.shape[0])[name]
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # parts carry no georef
                self.files[name] = rasterio.open(
                    f"{self._path(name)}.tmp", "w", driver="GTiff", width=self.scene.width,
                    height=self.strip.y1 - self.strip.y0, count=bands, dtype=dtype, nodata=nodata,
                    compress="deflate", zlevel=1, tiled=False)
                self.files[name].update_tags(channels=str(values.shape[0]))  # the model's K, for the class names
            self.files[name].write(arr, window=Window(0, row - self.strip.y0, arr.shape[-1], arr.shape[-2]))

    def close(self, ok: bool = True) -> None:
        for f in self.files.values():
            f.close()
        if not ok:
            return
        for name in self.files:
            os.replace(f"{self._path(name)}.tmp", self._path(name))
        (self.dir / f"strip_{self.strip.index:05d}.done").write_text(json.dumps(sorted(self.files)))


def assemble_scene(out_dir: Path, scene: SceneInfo, strips: tuple[Strip, ...], spec: OutputSpec,
                   tags: dict[str, str], *, block: int = 512) -> dict[str, Path]:
    """Join a scene's strip parts into its final COGs (+ quicklook); remove the parts. Returns the outputs."""
    import rasterio
    from rasterio.shutil import copy as rio_copy
    from rasterio.windows import Window

    pdir = parts_dir(out_dir, scene)
    finals = outputs_of(out_dir, scene, spec)
    for name in ("prob", "pred"):  # pred last: its presence (with the png) marks the scene as done
        if name not in finals:
            continue
        parts = [pdir / f"strip_{s.index:05d}.{name}.tif" for s in strips]
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(parts[0]) as p0:
            profile = {"dtype": p0.dtypes[0], "count": p0.count, "nodata": p0.nodata}
            k = int(p0.tags().get("channels", p0.count))
        resampling = spec.products(profile["count"])[name][3]
        tmp = out_dir / f".{scene.name}.{name}.assemble.tif"
        with rasterio.open(tmp, "w", driver="GTiff", width=scene.width, height=scene.height, crs=scene.crs,
                           transform=scene.transform, tiled=True, blockxsize=block, blockysize=block,
                           compress="deflate", zlevel=1, BIGTIFF="IF_SAFER", **profile) as dst:
            for strip, part in zip(strips, parts, strict=True):
                with rasterio.open(part) as src:
                    for r in range(0, src.height, block):
                        n = min(block, src.height - r)
                        dst.write(src.read(window=Window(0, r, scene.width, n)),
                                  window=Window(0, strip.y0 + r, scene.width, n))
            dst.update_tags(**tags)
            if spec.task == "segmentation":
                dst.update_tags(class_names=json.dumps(list(spec.names(k))))
            if name == "prob":
                for i, cname in enumerate(spec.names(dst.count), start=1):
                    dst.set_band_description(i, f"p({cname})")
            elif name == "pred":
                dst.set_band_description(1, "class" if spec.task == "segmentation" else "value")
        final_tmp = out_dir / f".{scene.name}.{name}.cog.tif"
        rio_copy(tmp, final_tmp, driver="COG", compress="DEFLATE", blocksize=block, overviews="AUTO",
                 overview_resampling=resampling, resampling=resampling, BIGTIFF="IF_SAFER")
        tmp.unlink()
        if name == "pred" and "png" in finals:
            from encdec.predict.quicklook import write_quicklook

            write_quicklook(final_tmp, finals["png"], spec, title=scene.name)
        os.replace(final_tmp, finals[name])
    shutil.rmtree(pdir, ignore_errors=True)
    remove_empty_parts(out_dir)
    return finals


def remove_empty_parts(out_dir: Path) -> None:
    """Remove ``OUT/.parts`` once no scene has parts left (the last scene done); a scene still being written, or
    a concurrent writer that has just created its folder, keeps it (``rmdir`` only removes an empty folder)."""
    try:
        (out_dir / ".parts").rmdir()
    except OSError:
        pass
