"""Tiled predict: windows/s per worker vs forward-only throughput of the same model, batch and precision; and peak
RSS of a worker for a large vs a small scene (flat in scene size).

    nice python benchmarks/predict_throughput.py throughput --model prithvi_eo_tiny --size 1024 --crop 64 --batch 8
    nice python benchmarks/predict_throughput.py throughput --model prithvi_eo_v2_300 --size 672 --crop 224 --batch 4
    nice python benchmarks/predict_throughput.py memory --model prithvi_eo_tiny --crop 64 --sizes 2048 8192
    python benchmarks/predict_throughput.py scaling --model prithvi_eo_tiny --size 2048 --crop 128 --workers 1 2

``throughput``: the forward-only figure runs the model alone on random batches ``[B, 6, crop, crop]``; the predict
figure is ``encdec.predict`` on a synthetic 6-band uint16 GeoTIFF of ``size`` x ``size`` (reading, normalising,
blending and writing the COG included), in this process, one worker. ``memory``: each scene size in a fresh
process (``ru_maxrss``), scenes written block by block (never in memory). ``scaling``: the same scene predicted
in this process and by 1..N single-thread Ray workers on a local Ray cluster started here (``--workers``), wall-time
speed-up against both baselines; run it on an otherwise idle machine (wall time on a shared box measures the queue).
The in-process worker's reader thread runs on a second core, so on a 2-core machine 2 workers (each reading on its
own core) cannot reach 2x of it: see ``null`` for the host pipeline's share of the CPU time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]


def build(name: str, crop: int, classes: int = 2):
    import torch

    from encdec.models import build_model

    torch.manual_seed(0)
    if name == "null":  # next to free: what the host pipeline (read, normalise, blend, write) sustains alone
        return torch.nn.Conv2d(6, classes, 1)
    if name == "conv":
        return torch.nn.Sequential(torch.nn.Conv2d(6, 16, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(16, classes, 3, padding=1))
    block = {"backbone": name, "backbone_pretrained": False, "backbone_img_size": crop, "backbone_bands": BANDS,
             "necks": [{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}],
             "decoder": "FCNDecoder", "decoder_channels": 64, "num_classes": classes}
    return build_model("segmentation", **block)


def write_scene(path: Path, size: int, block: int = 512) -> Path:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=6, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500000, 4600000, 30, 30), tiled=True,
                       blockxsize=block, blockysize=block, compress="deflate", zlevel=1, nodata=0,
                       BIGTIFF="IF_SAFER") as dst:
        tile = rng.integers(300, 4000, size=(6, block, size), dtype=np.uint16)
        for r in range(0, size, block):
            n = min(block, size - r)
            dst.write(tile[:, :n], window=Window(0, r, size, n))
    return path


def forward_only(model, batch: int, crop: int, precision: str, iters: int) -> float:
    import torch

    from encdec.predict.runner import make_forward

    fwd = make_forward(model, precision=precision)  # type: ignore[arg-type]
    x = torch.randn(batch, 6, crop, crop).numpy()
    for _ in range(2):
        fwd(x)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fwd(x)
    n = batch * iters
    return {"windows_per_s": n / (time.perf_counter() - t0), "windows_per_cpu_s": n / (time.process_time() - c0)}


def run_predict(model, scene: Path, out: Path, crop: int, batch: int, precision: str, workers: int = 1,
                read_threads: int | None = None, on_ray: bool | None = None) -> dict:
    import encdec

    delta = min(8, crop // 16)
    tiled = {"crop": crop, "stride": crop - max(2 * delta, crop // 8), "delta": delta, "batch_size": batch}
    t0, c0 = time.perf_counter(), time.process_time()
    res = encdec.predict(model, scene, out, tiled=tiled, means=[1000.0] * 6, stds=[500.0] * 6, quicklook=False,
                         precision=precision, workers=workers, overwrite=True,  # type: ignore[arg-type]
                         read_threads=read_threads, on_ray=on_ray)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert not res.failed, res.failed
    return {"windows": res.windows, "seconds": wall, "cpu_seconds": cpu, "windows_per_s": res.windows / wall,
            "windows_per_cpu_s": res.windows / cpu}


def throughput(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args.model, args.crop)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        scene = write_scene(Path(tmp) / "scene.tif", args.size)
        fo = forward_only(model, args.batch, args.crop, args.precision, args.iters)
        pr = run_predict(model, scene, Path(tmp) / "out", args.crop, args.batch, args.precision,
                         read_threads=args.read_threads)
        fo2 = forward_only(model, args.batch, args.crop, args.precision, args.iters)  # drift check on a busy box
    # On a shared machine wall time measures the queue; with one torch thread, CPU seconds per window do not.
    fo_cpu = (fo["windows_per_cpu_s"] + fo2["windows_per_cpu_s"]) / 2
    out = {"model": args.model, "size": args.size, "crop": args.crop, "batch": args.batch, "threads": args.threads,
           "read_threads": args.read_threads,
           "precision": args.precision,
           "forward_only": [{k: round(v, 2) for k, v in f.items()} for f in (fo, fo2)],
           "predict": {k: round(v, 3) for k, v in pr.items()},
           "ratio_cpu": round(pr["windows_per_cpu_s"] / fo_cpu, 3),
           "ratio_wall": round(pr["windows_per_s"] / ((fo["windows_per_s"] + fo2["windows_per_s"]) / 2), 3)}
    print(json.dumps(out))


def rss_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args.model, args.crop)
    pr = run_predict(model, Path(args.scene), Path(args.out), args.crop, args.batch, args.precision)
    print(json.dumps({**pr, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size in args.sizes:
            scene = write_scene(Path(tmp) / f"scene_{size}.tif", size)
            cmd = [sys.executable, __file__, "_rss", "--model", args.model, "--crop", str(args.crop), "--batch",
                   str(args.batch), "--threads", str(args.threads), "--precision", args.precision,
                   "--scene", str(scene), "--out", str(Path(tmp) / f"out_{size}")]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            rows.append({"size": size, **{k: round(v, 2) for k, v in res.items()}})
            scene.unlink()
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"model": args.model, "crop": args.crop, "batch": args.batch,
                      "rss_ratio_largest_vs_smallest": round(rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3)}))


def scaling(args: argparse.Namespace) -> None:
    """1 worker in this process, then each count of single-thread Ray workers (1 included: the same machinery,
    actor start-up and driver-side assembly as N, so that ratio is the scaling of the worker pool alone)."""
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    model = build(args.model, args.crop)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        scene = write_scene(Path(tmp) / "scene.tif", args.size)
        run_predict(model, scene, Path(tmp) / "warm", args.crop, args.batch, args.precision, workers=1)
        runs = [("in-process", 1, False)] + [("ray", n, True) for n in args.workers]
        for kind, n, on_ray in runs:
            res = run_predict(model, scene, Path(tmp) / f"out_{kind}_{n}", args.crop, args.batch, args.precision,
                              workers=n, on_ray=on_ray)
            rows.append({"kind": kind, "workers": n, "windows": res["windows"], "seconds": round(res["seconds"], 2),
                         "cpu_seconds_driver": round(res["cpu_seconds"], 2),
                         "windows_per_s": round(res["windows_per_s"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    base, ray1 = rows[0]["seconds"], rows[1]["seconds"]
    print(json.dumps({"model": args.model, "size": args.size, "crop": args.crop, "batch": args.batch,
                      "speedup_vs_in_process": {r["workers"]: round(base / r["seconds"], 3) for r in rows[1:]},
                      "speedup_vs_1_ray_worker": {r["workers"]: round(ray1 / r["seconds"], 3) for r in rows[1:]}}))
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["throughput", "memory", "scaling", "_rss"])
    p.add_argument("--model", default="prithvi_eo_tiny", help="null (1x1 conv), conv, prithvi_eo_tiny, prithvi_eo_v2_300, ...")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="scaling: worker counts, the first is the base")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--read-threads", type=int, default=None, help="throughput: reader threads (default: predict's)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--tmp", default=None, help="folder for the synthetic scenes")
    p.add_argument("--scene")
    p.add_argument("--out")
    args = p.parse_args()
    {"throughput": throughput, "memory": memory, "scaling": scaling, "_rss": rss_child}[args.mode](args)


if __name__ == "__main__":
    main()
