"""Per-worker peak memory and step time of DDP, FSDP2, ZeRO-2 and ZeRO-3 at 2 workers (CPU/gloo or GPUs).

Model: Prithvi-EO-2.0 300M (random weights: no download) + SelectIndices/ReshapeTokensToImage/
LearnedInterpolateToPyramidal + UperNet, segmentation, 2 classes; ``full`` fine-tunes everything, ``lora`` trains
LoRA r16 on q/v (+ necks, decoder, head). Micro-batch 2 per worker (global batch 4; UperNet's BatchNorm after
its 1x1 pooling needs 2 samples) of 6 x 224 x 224, AdamW, fp32 unless ``--precision``. Each (strategy, mode) is
one fresh run of 2 processes.

Memory per worker: on CPU the resident set size, sampled every 10 ms during the timed steps (``step peak``) and
the process lifetime maximum (``ru_maxrss``, which includes building the unsharded model); with CUDA the
``max_memory_allocated`` over the timed steps. Also per phase (highest RSS in forward / backward / optimizer
step), the RSS before and after building the model, and the bytes of this rank's optimizer state. Step time: median of the timed steps (forward + CE + backward +
optimizer step, with the collectives) in wall seconds, and the process CPU seconds per step (on a shared
machine wall time also measures other jobs' load; CPU seconds are the comparable figure).

    nice .venv/bin/python benchmarks/strategy_memory.py                      # all 8 runs, ~15 min on 2 cores
    nice .venv/bin/python benchmarks/strategy_memory.py --strategies ddp fsdp --modes lora --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))

STRATEGIES = {
    "ddp": ("ddp", {}),
    "fsdp": ("fsdp", {}),
    "zero2": ("deepspeed", {"zero_stage": 2}),
    "zero3": ("deepspeed", {"zero_stage": 3}),
}
LORA = {
    "method": "LORA",
    "replace_qkv": "qkv",
    "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 16, "lora_alpha": 16},
}


def model_args(mode: str, img_size: int) -> dict[str, Any]:
    """The benchmark model's ``build_model`` arguments (a TerraTorch ``model_args`` block)."""
    args: dict[str, Any] = {
        "backbone": "prithvi_eo_v2_300",
        "backbone_pretrained": False,
        "backbone_img_size": img_size,
        "necks": [
            {"name": "SelectIndices", "indices": [5, 11, 17, 23]},
            {"name": "ReshapeTokensToImage"},
            {"name": "LearnedInterpolateToPyramidal"},
        ],
        "decoder": "UperNetDecoder",
        "num_classes": 2,
    }
    if mode == "lora":
        args["peft_config"] = LORA
    return args


class RssSampler:
    """Samples this process's resident set size in a thread; ``peak`` is the maximum seen (bytes)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        import os

        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.phases: dict[str, int] = {}
        self._since_mark = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            self.peak = max(self.peak, rss)
            self._since_mark = max(self._since_mark, rss)
            time.sleep(self.interval_s)

    def mark(self, phase: str) -> None:
        """Close a phase: ``phases[phase]`` keeps the highest RSS seen since the previous mark (over all calls)."""
        rss = max(self._since_mark, self._rss())
        self.phases[phase] = max(self.phases.get(phase, 0), rss)
        self._since_mark = self._rss()

    def __enter__(self) -> RssSampler:
        self.peak = self._since_mark = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def worker(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank: build, shard, run warm-up + timed steps; returns its memory and times."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from encdec import build_model
    from encdec.distributed import make_strategy

    torch.set_num_threads(cfg["threads"])
    name, opts = STRATEGIES[cfg["strategy"]]
    if name == "deepspeed":
        opts = {**opts, "micro_batch": cfg["micro_batch"]}
    torch.manual_seed(0)
    rss_start = RssSampler()._rss()
    t0 = time.perf_counter()
    model = build_model("segmentation", **model_args(cfg["mode"], cfg["img_size"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rss_built = RssSampler()._rss()
    from encdec.config import OptimSection
    from encdec.train.optim import build_optimizer

    strategy = make_strategy(name, optimizer_factory=build_optimizer, **opts)
    strategy.setup(
        model,
        OptimSection(name="adamw", lr=1e-4, weight_decay=0.05, grad_clip=1.0),
        precision=cfg["precision"],
        grad_accum=1,
        activation_checkpointing=cfg["activation_checkpointing"],
    )
    setup_s = time.perf_counter() - t0
    rss_setup = RssSampler()._rss()
    dev = strategy.device
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(cfg["micro_batch"], 6, cfg["img_size"], cfg["img_size"], generator=g).to(dev)
    y = torch.randint(0, 2, (cfg["micro_batch"], cfg["img_size"], cfg["img_size"]), generator=g).to(dev)

    def one_step(rss: RssSampler | None = None) -> float:
        cpu_times.append(time.process_time())
        start = time.perf_counter()
        with strategy.no_sync(is_last_micro=True), strategy.autocast():
            loss = F.cross_entropy(strategy.model(x).output.float(), y)
        if rss is not None:
            rss.mark("forward")
        strategy.backward(loss / strategy.world_size)  # normalised for the global batch, as the loop does
        if rss is not None:
            rss.mark("backward")
        strategy.step(max_norm=1.0)
        if rss is not None:
            rss.mark("optimizer step")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        cpu_times[-1] = time.process_time() - cpu_times[-1]
        return time.perf_counter() - start

    cpu_times: list[float] = []
    for _ in range(cfg["warmup"]):
        one_step()  # optimizer state is created on the first step: measure after it
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with RssSampler() as rss:
        cpu_times.clear()
        times = [one_step(rss) for _ in range(cfg["steps"])]
    out = {
        "rank": rank,
        "step_s": statistics.median(times),
        "times": times,
        "cpu_s": statistics.median(cpu_times),
        "rss_step_peak_gib": rss.peak / 2**30,
        "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "setup_s": setup_s,
        "rss_after_setup_gib": rss_setup / 2**30,
        "rss_before_build_gib": rss_start / 2**30,
        "rss_after_build_gib": rss_built / 2**30,
        "rss_phase_peak_gib": {k: v / 2**30 for k, v in rss.phases.items()},
        "optimizer_state_gib": _optimizer_state_bytes(strategy.optimizer) / 2**30,
        "params": total,
        "trainable": trainable,
    }
    if dev.type == "cuda":
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of this rank's optimizer state tensors (Adam moments; a DTensor counts its local shard)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            local = v.to_local() if hasattr(v, "to_local") else v
            if hasattr(local, "numel") and local.dim() > 0:
                total += local.numel() * local.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    from _spawn import run_distributed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=2, help="per worker (global batch = 2 x this); >= 2 for BatchNorm")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (2 workers share the cores)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)

    rows = []
    for mode in args.modes:
        for strat in args.strategies:
            cfg = {"strategy": strat, "mode": mode, "steps": args.steps, "warmup": args.warmup,
                   "micro_batch": args.micro_batch, "img_size": args.img_size, "precision": args.precision,
                   "activation_checkpointing": args.activation_checkpointing, "threads": args.threads}
            t = time.perf_counter()
            ranks = run_distributed(worker, 2, cfg, timeout_s=3600)
            row = {"strategy": strat, "mode": mode, "wall_s": time.perf_counter() - t, "ranks": ranks}
            rows.append(row)
            r = max(ranks, key=lambda d: d["rss_step_peak_gib"])
            print(f"{mode:4} {strat:5} step {statistics.median(d['step_s'] for d in ranks):6.2f} s wall "
                  f"{statistics.median(d['cpu_s'] for d in ranks):6.2f} s CPU  "
                  f"RSS after setup {r['rss_after_setup_gib']:5.2f} GiB, step peak {r['rss_step_peak_gib']:5.2f} GiB, "
                  f"lifetime {r['ru_maxrss_gib']:5.2f} GiB  "
                  f"(before build {r['rss_before_build_gib']:.2f}, built {r['rss_after_build_gib']:.2f}, peaks "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["rss_phase_peak_gib"].items())
                  + f"; optimizer state {r['optimizer_state_gib']:.2f} GiB)  "
                  f"trainable {r['trainable'] / 1e6:.1f}M / {r['params'] / 1e6:.1f}M", flush=True)

    print("\n| mode | strategy | step wall (s) | step CPU (s) | per-worker RSS, steps (GiB) | "
          "per-worker RSS, lifetime (GiB) | RSS vs DDP |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        peak = max(d["rss_step_peak_gib"] for d in row["ranks"])
        ddp = next((r for r in rows if r["mode"] == row["mode"] and r["strategy"] == "ddp"), None)
        ratio = peak / max(d["rss_step_peak_gib"] for d in ddp["ranks"]) if ddp else float("nan")
        step = statistics.median(d["step_s"] for d in row["ranks"])
        life = max(d["ru_maxrss_gib"] for d in row["ranks"])
        cpu = statistics.median(d["cpu_s"] for d in row["ranks"])
        print(f"| {row['mode']} | {row['strategy']} | {step:.2f} | {cpu:.2f} | {peak:.2f} | {life:.2f} | {ratio:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
