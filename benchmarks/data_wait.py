"""End to end into 2 Ray Train workers: tiles/s and the fraction of step time a worker waits for data.

Each worker builds its iterator with ``encdec.data.build_iterator`` (feed ``reader`` or ``ray``) and trains a
tiny Prithvi + UperNet segmentation model (``encdec.build_model``) with DDP on gloo for ``--steps`` steps on
synthetic HLS-like tiles. Data-wait % = time blocked in ``next(iterator)`` / step wall time (after warm-up),
averaged over the two workers. Workers reserve 0.5 CPU each so Ray Data gets CPU on a 2-core machine.

    .venv/bin/python benchmarks/data_wait.py --feeds reader ray --img-size 224 --steps 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL: dict[str, Any] = {
    "backbone": "prithvi_eo_tiny", "backbone_pretrained": False,
    "backbone_bands": ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"],
    "necks": [{"name": "SelectIndices", "indices": [0, 1, 2, 3]}, {"name": "ReshapeTokensToImage"},
              {"name": "LearnedInterpolateToPyramidal"}],
    "decoder": "UperNetDecoder", "decoder_channels": 64, "num_classes": 2,
}


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker body: DDP steps timing the wait for each batch; writes its figures to a JSON file."""
    import ray.train
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from encdec import build_model
    from encdec.config import DataSection
    from encdec.data import build_iterator

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    it = build_iterator(DataSection.model_validate(config["data"]), rank=rank, world_size=world, seed=0, feed=config["feed"])
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model("segmentation", backbone_img_size=config["data"]["img_size"], **MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wait = total = 0.0
    tiles = 0
    for step in range(config["steps"]):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(batch["image"]).output, batch["mask"], ignore_index=-1)
        loss.backward()
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        if step >= config["warmup"]:
            wait += t1 - t0
            total += t2 - t0
            tiles += int(batch["image"].shape[0])
    it.close()
    out = {"rank": rank, "wait_s": wait, "step_total_s": total, "tiles": tiles,
           "steps": config["steps"] - config["warmup"]}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))


def run(feed: str, data: dict[str, Any], steps: int, warmup: int, out_dir: Path) -> dict[str, Any]:
    """One ``fit()`` with 2 workers; returns tiles/s and data-wait %."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = out_dir / f"feed-{feed}"
    out.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"feed": feed, "data": data, "steps": steps, "warmup": warmup, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=f"data-wait-{feed}-{int(time.time())}", storage_path=str(out_dir / "ray_storage")),
    )
    trainer.fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    wall = max(r["step_total_s"] for r in ranks)
    return {
        "feed": feed, "img_size": data["img_size"], "global_batch_size": data["global_batch_size"],
        "timed_steps": ranks[0]["steps"],
        "step_s": round(wall / ranks[0]["steps"], 3),
        "tiles_per_s": round(sum(r["tiles"] for r in ranks) / wall, 1),
        "data_wait_pct": round(100 * sum(r["wait_s"] for r in ranks) / sum(r["step_total_s"] for r in ranks), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--feeds", nargs="+", default=["reader", "ray"], choices=["reader", "ray"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--tiles", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="reader threads per worker")
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args()
    import ray

    from encdec.data.synthetic import write_tiles

    root = args.dir or Path(tempfile.mkdtemp(prefix="encdec-wait-"))
    tiles = write_tiles(root / "tiles", args.tiles, img_size=args.img_size, seed=0)
    data = {"train": {"tiles": str(tiles)}, "img_size": args.img_size, "global_batch_size": args.global_batch,
            "augment": {"hflip": True, "vflip": True, "rot90": True},
            "reader": {"threads": args.threads, "prefetch_batches": 2, "ray_cpus_per_task": 0.5}}
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir="/tmp/ray-data-h", log_to_driver=False)
    try:
        results = [run(feed, data, args.steps, args.warmup, root) for feed in args.feeds]
    finally:
        ray.shutdown()
    for r in results:
        print(json.dumps(r))
    print("\n| feed | tile | global batch | step s | tiles/s | data-wait % |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['feed']} | {r['img_size']} | {r['global_batch_size']} | {r['step_s']} | {r['tiles_per_s']} | "
              f"{r['data_wait_pct']} |")


if __name__ == "__main__":
    main()
