"""Metrics of predicted scenes against reference rasters, streamed by row blocks (no whole scene in memory).

Segmentation: confusion matrix, per-class IoU/F1/precision/recall, mIoU, overall accuracy; regression: RMSE, MAE,
R². Written as ``metrics.json`` + ``metrics.csv`` (+ ``confusion_matrix.csv`` and ``.png``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["check_references", "confusion_metrics", "evaluate_scenes"]


class EvaluateError(ValueError):
    """A prediction and its reference cannot be compared; the message names both files and the fix."""


def confusion_metrics(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class and mean metrics from a confusion matrix (rows: reference, columns: prediction)."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    ref, pred = cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (ref + pred - tp)
        precision = tp / pred
        recall = tp / ref
        f1 = 2 * precision * recall / (precision + recall)
    names = list(class_names or [str(i) for i in range(len(tp))])
    present = ref > 0
    per_class = {names[i]: {"iou": _f(iou[i]), "f1": _f(f1[i]), "precision": _f(precision[i]),
                            "recall": _f(recall[i]), "support": int(ref[i])} for i in range(len(tp))}
    return {
        "mIoU": _f(np.nanmean(np.where(present, iou, np.nan))) if present.any() else None,
        "accuracy": _f(tp.sum() / cm.sum()) if cm.sum() else None,
        "mean_f1": _f(np.nanmean(np.where(present, f1, np.nan))) if present.any() else None,
        "per_class": per_class,
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "pixels": int(cm.sum()),
    }


def _f(x: Any) -> float | None:
    return None if not np.isfinite(x) else float(x)


def _grid(raster: Any) -> tuple[tuple[int, int], Any, Any]:
    """Size, CRS and transform of an open raster or a scene's header: equal grids compare pixel for pixel."""
    return (raster.height, raster.width), raster.crs, raster.transform


def _check_grid(pred: Any, ref: Any) -> None:
    if _grid(pred) != _grid(ref):
        raise EvaluateError(f"{pred.name} ({pred.shape}, {pred.crs}) and reference {ref.name} ({ref.shape}, {ref.crs}) "
                            f"are not on the same grid. Fix: warp the reference onto the scene's grid "
                            f"(gdalwarp -te/-tr/-t_srs from the scene).")


def check_references(scenes: Sequence[str], refs: Sequence[str],
                     gdal_options: dict[str, str] | None = None) -> list[str]:
    """Before any prediction: each reference must open and lie on its scene's grid (size, CRS, transform).

    Returns one line per reference (``scene -> reference: H x W, CRS``). Raises :class:`EvaluateError` listing
    every reference that cannot be compared, so that hours of prediction are not spent first.
    """
    import rasterio

    from encdec.predict.rasters import gdal_env
    from encdec.predict.scenes import SceneError, open_scene

    lines: list[str] = []
    bad: list[str] = []
    for scene, ref in zip(scenes, refs, strict=True):
        try:
            with gdal_env(gdal_options):
                info = open_scene(scene, require_crs=False)
                with rasterio.open(ref) as fr:
                    grid = _grid(fr)
        except (SceneError, rasterio.errors.RasterioIOError) as e:
            bad.append(f"{scene} / {ref}: {e}")
            continue
        want = _grid(info)
        if grid != want:
            bad.append(f"reference {ref} ({grid[0][0]}x{grid[0][1]}, {grid[1]}) is not on the grid of scene {scene} "
                       f"({want[0][0]}x{want[0][1]}, {want[1]}{'' if grid[2] == want[2] else ', another transform'})")
            continue
        lines.append(f"{scene} -> {ref}: {grid[0][0]}x{grid[0][1]}, {grid[1]}")
    if bad:
        raise EvaluateError("--references: " + "; ".join(bad) + ". Fix: give one reference per scene, in the same "
                            "order, warped onto the scene's grid (gdalwarp -te/-tr/-t_srs from the scene).")
    return lines


def evaluate_scenes(preds: Sequence[str], refs: Sequence[str], out_dir: Path, *, task: str, num_classes: int = 2,
                    class_names: Sequence[str] | None = None, ignore_index: int | None = None,
                    block_rows: int = 512) -> dict[str, Any]:
    """Compare predicted rasters with references (same grid), write metrics files, return the metrics."""
    import rasterio
    import torch
    from rasterio.windows import Window

    from encdec.train.metrics import RegressionMetrics, count_confusion

    out_dir.mkdir(parents=True, exist_ok=True)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    reg = RegressionMetrics()  # the engine's sums: RMSE, MAE and R² exactly as validation and --split compute them
    for p, r in zip(preds, refs, strict=True):
        with rasterio.open(p) as fp, rasterio.open(r) as fr:
            _check_grid(fp, fr)
            for row in range(0, fp.height, block_rows):
                win = Window(0, row, fp.width, min(block_rows, fp.height - row))
                a, b = fp.read(1, window=win), fr.read(1, window=win)
                if task == "segmentation":
                    ok = (a != 255) & (b >= 0) & (b < num_classes)
                    if fr.nodata is not None:
                        ok &= b != fr.nodata
                    if ignore_index is not None:
                        ok &= b != ignore_index
                    cm += count_confusion(torch.from_numpy(b[ok].astype(np.int64)),
                                          torch.from_numpy(a[ok].astype(np.int64)), num_classes)
                else:
                    ok = np.isfinite(a) & np.isfinite(b)
                    if fr.nodata is not None:
                        ok &= b != fr.nodata
                    reg.update(torch.from_numpy(a[ok].astype(np.float64)), torch.from_numpy(b[ok].astype(np.float64)))
    if task == "segmentation":
        metrics = confusion_metrics(cm.numpy(), class_names)
        _write_segmentation(out_dir, metrics)
    else:
        metrics = {k: _f(v) for k, v in reg.compute().items()}
        metrics["pixels"] = int(reg.totals[2])
        with (out_dir / "metrics.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["metric", "value"], *[[k, v] for k, v in metrics.items()]])
    metrics["scenes"] = list(preds)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _write_segmentation(out_dir: Path, m: dict[str, Any]) -> None:
    with (out_dir / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou", "f1", "precision", "recall", "support"])
        for name, v in m["per_class"].items():
            w.writerow([name, v["iou"], v["f1"], v["precision"], v["recall"], v["support"]])
        w.writerow(["mean", m["mIoU"], m["mean_f1"], "", "", m["pixels"]])
        w.writerow(["accuracy", m["accuracy"], "", "", "", ""])
    names = list(m["per_class"])
    cm = np.asarray(m["confusion_matrix"])
    with (out_dir / "confusion_matrix.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["reference \\ predicted", *names])
        for name, row in zip(names, cm.tolist(), strict=True):
            w.writerow([name, *row])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(names), 1 + 0.6 * len(names)), dpi=100)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(f"mIoU {m['mIoU']:.3f}" if m["mIoU"] is not None else "mIoU n/a", fontsize=9)
    fig.savefig(out_dir / "confusion_matrix.png", bbox_inches="tight")
    plt.close(fig)
