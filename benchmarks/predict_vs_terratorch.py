"""Side by side with TerraTorch 1.2.11's ``tiled_inference`` on the same model, weights and scene: speed, peak RSS,
max abs difference of the outputs.

    nice python benchmarks/predict_vs_terratorch.py --size 2048 --tt-python /work/tt-venv/bin/python

Each side runs in its own fresh process (one torch thread): TerraTorch's needs the whole scene as one tensor (read
with rasterio), ours streams windows from the file and writes a COG. The TerraTorch side imports TerraTorch, never
encdec. The model is a seeded conv net defined here (regression: one float32 output band, so outputs compare
directly).
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

TILED = {"crop": 224, "stride": 192, "delta": 8, "batch_size": 8}


def seeded_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 1, 3, padding=1))
    return net.eval()


def run_terratorch(scene: str, out: str) -> dict:
    import rasterio
    import torch
    from terratorch.tasks.tiled_inference import tiled_inference

    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    with rasterio.open(scene) as src:
        x = torch.from_numpy(src.read().astype(np.float32))[None]
    with torch.no_grad():
        y = tiled_inference(seeded_model(), x, **TILED)[0, 0].numpy()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(out, y)
    return {"seconds": wall, "cpu_seconds": cpu,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_ours(scene: str, out: str) -> dict:
    import rasterio
    import torch

    import encdec

    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    res = encdec.predict(seeded_model(), scene, Path(out).parent / "ours", task="regression", tiled=TILED,
                         quicklook=False, overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with rasterio.open(res.outputs[scene]["pred"]) as f:
        np.save(out, f.read(1))
    return {"seconds": wall, "cpu_seconds": cpu, "windows": res.windows,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--tt-python", default="/work/tt-venv/bin/python")
    p.add_argument("--side", choices=["terratorch", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--scene", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        fn = run_terratorch if args.side == "terratorch" else run_ours
        print(json.dumps(fn(args.scene, args.out)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from predict_throughput import write_scene

    with tempfile.TemporaryDirectory() as tmp:
        scene = str(write_scene(Path(tmp) / "scene.tif", args.size))
        res = {}
        for side, py in (("terratorch", args.tt_python), ("ours", sys.executable)):
            cmd = [py, __file__, "--side", side, "--scene", scene, "--out", f"{tmp}/{side}.npy"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
            res[side] = json.loads(done.stdout.splitlines()[-1])
        ref, ours = np.load(f"{tmp}/terratorch.npy"), np.load(f"{tmp}/ours.npy")
        diff = float(np.abs(ref - ours).max())
    print(json.dumps({"size": args.size, **TILED, **res, "max_abs_diff": diff,
                      "max_abs_output": float(np.abs(ref).max())}))


if __name__ == "__main__":
    main()
