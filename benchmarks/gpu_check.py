"""GPU checks that no CPU test can make: the engine on CUDA/NCCL, and speed on the GPU, in one short run.

    python benchmarks/gpu_check.py --out results.json            # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --smoke                       # the same path on CPU/gloo, tiny sizes

1. ``engine``: a one-rank NCCL process group (``train.pg_timeout_s`` honoured), the real ``train()`` loop with
   FSDP2 and DDP in bf16 on synthetic tiles (tiny Prithvi + LoRA + UperNet), recording every ``dist.barrier`` call
   the strategies make (NCCL barriers must name the device: ray-project/ray#57860).
2. ``step``: the 300M Prithvi + LoRA r16 + UperNet train step under FSDP2, bf16, batch 8x6x224x224: step time and
   peak GPU memory.
3. ``predict``: 300M forward-only windows/s vs ``encdec.predict`` windows/s on a synthetic 6-band scene (reading,
   normalising, blending and writing the COG included), bf16, same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]


def _model(backbone: str, img: int, r: int) -> dict[str, Any]:
    return {
        "backbone": backbone, "backbone_pretrained": False, "backbone_img_size": img, "backbone_bands": BANDS,
        "necks": [{"name": "SelectIndices", "indices": [-4, -3, -2, -1]}, {"name": "ReshapeTokensToImage"},
                  {"name": "LearnedInterpolateToPyramidal"}],
        "decoder": "UperNetDecoder", "decoder_channels": 64 if backbone == "prithvi_eo_tiny" else 256,
        "num_classes": 2,
        "peft_config": {"method": "LORA", "replace_qkv": "qkv",
                        "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": r,
                                               "lora_alpha": r}},
    }


def _one_rank_group() -> None:
    """A one-rank process group (NCCL on a GPU, else gloo), as Ray Train would make it; idempotent."""
    from encdec.distributed import init_process_group

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    init_process_group(timeout_s=600)


def engine(smoke: bool, tmp: Path) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from encdec.config import DataSection, LossSection, ModelSection, OptimSection, TrainSection
    from encdec.data.synthetic import write_tiles
    from encdec.train.loop import train

    _one_rank_group()
    calls: list[dict[str, Any]] = []
    real_barrier = dist.barrier

    def barrier(*a: Any, **kw: Any) -> Any:
        calls.append({"args": [str(x) for x in a], "device_ids": kw.get("device_ids")})
        return real_barrier(*a, **kw)

    dist.barrier = barrier  # type: ignore[assignment]  # records our call sites' arguments, then calls through
    img = 32 if smoke else 64
    tiles = {s: str(write_tiles(tmp / s, n, img_size=img, seed=i)) for i, (s, n) in enumerate([("train", 32),
                                                                                             ("val", 8)])}
    out: dict[str, Any] = {"backend": dist.get_backend(), "device": torch.cuda.get_device_name(0)
                           if torch.cuda.is_available() else "cpu"}
    for strategy in ("fsdp", "ddp"):
        calls.clear()
        t0 = time.perf_counter()
        final = train(
            task="segmentation",
            model=ModelSection.model_validate(_model("prithvi_eo_tiny", img, 4)),
            loss=LossSection.model_validate({"name": "ce", "ignore_index": -1}),
            data=DataSection.model_validate({"train": {"tiles": tiles["train"]}, "val": {"tiles": tiles["val"]},
                                             "img_size": img, "global_batch_size": 8, "bands": BANDS}),
            optim=OptimSection.model_validate({"lr": 2e-3, "warmup_steps": 2}),
            train=TrainSection.model_validate({"max_steps": 6 if smoke else 30, "precision": "fp32" if smoke
                                               else "bf16", "strategy": strategy, "log_every": 5, "val_every": 15,
                                               "ckpt_every": 15, "pg_timeout_s": 600}),
            seed=0, run_dir=str(tmp / f"run_{strategy}"),
        )
        out[strategy] = {"seconds": round(time.perf_counter() - t0, 2), "step": final["step"],
                         "train_loss": final.get("train/loss"), "val_mIoU": final.get("val/mIoU"),
                         "barriers": list(calls)}
    dist.barrier = real_barrier  # type: ignore[assignment]
    return out


def step(smoke: bool) -> dict[str, Any]:
    import torch

    from encdec.config import ModelSection, OptimSection
    from encdec.distributed import make_strategy
    from encdec.models import build_model
    from encdec.train.optim import build_optimizer

    backbone, img, batch = ("prithvi_eo_tiny", 64, 2) if smoke else ("prithvi_eo_v2_300", 224, 8)
    _one_rank_group()
    torch.manual_seed(0)
    net = build_model("segmentation", **ModelSection.model_validate(_model(backbone, img, 16)).factory_kwargs())
    strategy = make_strategy("fsdp", optimizer_factory=build_optimizer)
    strategy.setup(net, OptimSection.model_validate({"lr": 1e-4}), precision="bf16",
                   grad_accum=1, activation_checkpointing=False)
    dev = strategy.device
    x = torch.randn(batch, 6, img, img, device=dev)
    y = torch.randint(0, 2, (batch, img, img), device=dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(3 if smoke else 8):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with strategy.autocast():
            loss = torch.nn.functional.cross_entropy(strategy.model(x).output.float(), y)
        strategy.backward(loss)
        strategy.step(1.0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"backbone": backbone, "batch": batch, "step_s_median": sorted(times)[len(times) // 2],
            "samples_per_s": batch / sorted(times)[len(times) // 2], "peak_gpu_gib": peak}


def predict(smoke: bool, tmp: Path) -> dict[str, Any]:
    import numpy as np
    import rasterio
    import torch
    from rasterio.transform import from_origin

    from encdec.models import build_model
    from encdec.predict.api import predict as run_predict

    backbone, crop, size, batch = ("prithvi_eo_tiny", 64, 256, 4) if smoke else ("prithvi_eo_v2_300", 224, 4096, 16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16" if dev == "cuda" else "fp32"
    torch.manual_seed(0)
    block = _model(backbone, crop, 16)
    block.pop("peft_config")
    net = build_model("segmentation", **block).eval().to(dev)
    scene = tmp / "scene.tif"
    rng = np.random.default_rng(0)
    with rasterio.open(scene, "w", driver="GTiff", width=size, height=size, count=6, dtype="uint16", tiled=True,
                       blockxsize=256, blockysize=256, crs="EPSG:32610", transform=from_origin(500000, 4e6, 30, 30),
                       nodata=0) as ds:
        for row in range(0, size, 256):
            h = min(256, size - row)
            ds.write(rng.integers(1, 4000, (6, h, size), dtype=np.uint16),
                     window=rasterio.windows.Window(0, row, size, h))
    x = torch.randn(batch, 6, crop, crop, device=dev)
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16"):
        net(x)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 3 if smoke else 20
        for _ in range(n):
            net(x)
        if dev == "cuda":
            torch.cuda.synchronize()
        fwd = n * batch / (time.perf_counter() - t0)
    res = run_predict(net, [scene], tmp / "pred", tiled={"crop": crop, "stride": crop - 32, "delta": 8,
                                                           "batch_size": batch},
                      means=[1000.0] * 6, stds=[500.0] * 6, precision=precision, device=dev, quicklook=False)
    return {"backbone": backbone, "scene": size, "crop": crop, "batch": batch, "forward_windows_per_s": fwd,
            "predict_windows_per_s": res.windows_per_s, "ratio": res.windows_per_s / fwd, "windows": res.windows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU/gloo (checks the script itself)")
    p.add_argument("--only", nargs="*", default=["engine", "step", "predict"])
    p.add_argument("--out")
    args = p.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.only:
            t0 = time.perf_counter()
            try:
                fn = {"engine": lambda: engine(args.smoke, Path(d)), "step": lambda: step(args.smoke),
                      "predict": lambda: predict(args.smoke, Path(d))}[name]
                results[name] = fn()
            except Exception as e:  # report and go on: one failing check must not hide the others
                import traceback

                results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(results[name], default=str), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
