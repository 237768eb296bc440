"""Training-step time, peak RSS and FLOP/s: encdec's step against TerraTorch's, same model and batch.

Model (TerraTorch ``model_args``, identical on both sides): ``prithvi_eo_v2_300`` (random init) +
SelectIndices [5, 11, 17, 23] + ReshapeTokensToImage + LearnedInterpolateToPyramidal + UperNetDecoder, 2 classes,
LoRA r16 / alpha 16 on q and v after the qkv split. Batch ``[2, 6, 224, 224]``. One step = forward +
cross-entropy + backward + AdamW (no clipping).

* encdec: exactly the loop's step (``encdec.train.loop``): ``make_strategy("none")`` + ``strategy.setup`` +
  ``strategy.autocast()`` + ``TaskLoss`` sums/normalisers + ``strategy.backward`` + ``strategy.step``; under bf16
  the frozen base weights are stored in bf16 once (``store_for_autocast``), trainable ones stay fp32.
* TerraTorch: its ``EncoderDecoderFactory``, ``F.cross_entropy``, ``torch.optim.AdamW``; bf16 = ``torch.autocast``
  around forward + loss (what Lightning's ``bf16-mixed`` does), so every frozen weight is re-cast each step.

Each configuration runs in its own process (peak RSS = that process's ``ru_maxrss``: build + steps) after a warm-up
step; the configurations of one precision run side by side, taking one step each in turn, so that load from other
jobs on a shared machine hits them alike. TerraTorch runs from its own venv (``--tt-python``).
FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode``; the matmul peak is the best
of a few ``torch.mm`` of 4096x4096 at the same thread count.

    nice .venv/bin/python benchmarks/train_step.py --tt-python /work/tt-venv/bin/python --out bench.json
    nice .venv/bin/python benchmarks/train_step.py --only encdec-bf16 encdec-bf16-ac --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

MODEL_ARGS: dict[str, Any] = {
    "backbone": "prithvi_eo_v2_300",
    "backbone_pretrained": False,
    "necks": [
        {"name": "SelectIndices", "indices": [5, 11, 17, 23]},
        {"name": "ReshapeTokensToImage"},
        {"name": "LearnedInterpolateToPyramidal"},
    ],
    "decoder": "UperNetDecoder",
    "num_classes": 2,
    "peft_config": {
        "method": "LORA",
        "replace_qkv": "qkv",
        "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 16, "lora_alpha": 16},
    },
}
BATCH = (2, 6, 224, 224)
# name: (implementation, precision, option: "" | "ac" (activation checkpointing) | "compile" (torch.compile of each
# sharding unit, as train.compile does)). ``terratorch-fp32`` is TerraTorch as shipped:
# importing it runs ``torch.set_float32_matmul_precision("medium")`` (terratorch/models/backbones/clay_v15/model.py),
# which on a CPU with AMX/AVX-512-BF16 makes oneDNN compute fp32 matmuls in bf16; ``terratorch-fp32-highest``
# restores true fp32 matmuls after the import.
CONFIGS = {
    "encdec-fp32": ("encdec", "fp32", ""),
    "encdec-fp32-ac": ("encdec", "fp32", "ac"),
    "encdec-bf16": ("encdec", "bf16", ""),
    "encdec-bf16-ac": ("encdec", "bf16", "ac"),
    "encdec-bf16-compile": ("encdec", "bf16", "compile"),
    "terratorch-fp32": ("terratorch", "fp32", ""),
    "terratorch-fp32-highest": ("terratorch", "fp32-highest", ""),
    "terratorch-bf16": ("terratorch", "bf16", ""),
}
# configurations measured side by side (one step each in turn); at most three 300M models in memory at once
GROUPS = [
    ("encdec-fp32", "terratorch-fp32-highest", "terratorch-fp32"),
    ("encdec-bf16", "terratorch-bf16", "encdec-bf16-compile"),
    ("encdec-fp32-ac", "encdec-bf16-ac"),
]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*BATCH, generator=g)
    y = torch.randint(0, 2, (BATCH[0], *BATCH[2:]), generator=g)
    return x, y


def _encdec_step(precision: str, option: str) -> tuple[Any, int, int]:
    from encdec import build_model
    from encdec.config import LossSection, OptimSection
    from encdec.distributed import make_strategy
    from encdec.train.losses import build_loss
    from encdec.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model("segmentation", **MODEL_ARGS)
    strategy = make_strategy("none", optimizer_factory=build_optimizer)
    strategy.store_frozen_weights(model, precision)  # as the loop does (none/ddp: frozen weights in bf16 once)
    if option == "compile":
        for unit in model.sharding_units():
            unit.compile()
    strategy.setup(model, OptimSection(name="adamw", lr=1e-4, weight_decay=0.05), precision=precision, grad_accum=1,
                   activation_checkpointing=option == "ac")
    loss_fn = build_loss("segmentation", LossSection(name="ce", ignore_index=-1))
    x, y = _batch()
    batch = {"image": x, "mask": y}

    def step() -> float:
        with strategy.autocast():
            out = strategy.model(batch["image"])
        loss = loss_fn.combine(loss_fn.sums(out, batch), loss_fn.normalizers(batch))
        strategy.backward(loss)
        strategy.step(None)
        return float(loss.detach())

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return step, trainable, sum(p.numel() for p in model.parameters())


def _terratorch_step(precision: str, option: str) -> tuple[Any, int, int]:
    import torch.nn.functional as F
    from terratorch.models import EncoderDecoderFactory

    if option:
        raise SystemExit(f"option {option!r} is not measured for TerraTorch")
    if precision == "fp32-highest":
        torch.set_float32_matmul_precision("highest")  # undo the import-time "medium" (see CONFIGS)
    torch.manual_seed(0)
    model = EncoderDecoderFactory().build_model(task="segmentation", **MODEL_ARGS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    x, y = _batch()

    def step() -> float:
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x).output
                loss = F.cross_entropy(out, y, ignore_index=-1)
        else:
            loss = F.cross_entropy(model(x).output, y, ignore_index=-1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())


def _build(impl: str, precision: str, option: str, threads: int) -> tuple[Any, dict[str, Any]]:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    step, trainable, total = (_encdec_step if impl == "encdec" else _terratorch_step)(precision, option)
    return step, {"impl": impl, "precision": precision, "option": option, "threads": threads,
                  "build_s": time.perf_counter() - t0, "trainable": trainable, "params": total,
                  "torch": torch.__version__, "float32_matmul_precision": torch.get_float32_matmul_precision()}


def serve(impl: str, precision: str, option: str, threads: int) -> None:
    """Worker: build, warm up, then run one step per ``step`` line on stdin, answering a JSON line each;
    ``done`` answers the peak RSS and exits. Lets the parent interleave two implementations step by step."""
    step, info = _build(impl, precision, option, threads)
    t0 = time.perf_counter()
    step()  # warm-up: first-call allocations, kernel selection (and compilation)
    info["first_step_s"] = time.perf_counter() - t0
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t, c = time.perf_counter(), time.process_time()
            loss = step()
            print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "loss": loss}),
                  flush=True)
        else:
            print(json.dumps({"peak_rss_gb": _peak_rss_gb()}), flush=True)
            return


def count_flops(threads: int) -> int:
    """FLOPs of one encdec fp32 step (matmuls, convolutions, attention) by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = _build("encdec", "fp32", "", threads)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def matmul_peak(threads: int, n: int = 4096, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` FLOP/s of an ``n x n`` matmul in fp32 and bf16."""
    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best
    return out


class _Worker:
    """A ``serve`` subprocess."""

    def __init__(self, python: str, name: str, threads: int) -> None:
        impl, precision, option = CONFIGS[name]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [python, __file__, "--serve", impl, precision, option or "-", "--threads", str(threads)]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()
        self.info["runs"] = []

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return dict(json.loads(line))
        raise RuntimeError(f"{self.name}: worker exited with {self.proc.wait()} (see its stderr above)")

    def step(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        self.info["runs"].append(self._read())

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        self.info.update(self._read())
        self.proc.wait(timeout=120)
        walls = [r["wall"] for r in self.info["runs"]]
        cpus = [r["cpu"] for r in self.info["runs"]]
        self.info.update(median_s=statistics.median(walls), min_s=min(walls), median_cpu_s=statistics.median(cpus))
        return self.info


def _child_json(args: list[str], threads: int) -> Any:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)], capture_output=True, text=True,
                         env=env, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configurations (default: all)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tt-python", default="/work/tt-venv/bin/python", help="python of the TerraTorch venv")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--serve", nargs=3, metavar=("IMPL", "PRECISION", "OPTION"), help=argparse.SUPPRESS)
    parser.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        impl, precision, option = args.serve
        serve(impl, precision, "" if option == "-" else option, args.threads)
        return 0
    if args.peak:
        print(json.dumps(matmul_peak(args.threads)))
        return 0
    if args.flops:
        print(json.dumps(count_flops(args.threads)))
        return 0

    results: dict[str, Any] = {"peak": _child_json(["--peak"], args.threads)}
    peak = results["peak"]
    print(f"matmul peak at {args.threads} threads: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    flops = results["flops_per_step"] = _child_json(["--flops"], args.threads)
    print(f"FLOPs per step (FlopCounterMode): {flops / 1e9:.0f} GFLOP", flush=True)

    names = set(args.only or CONFIGS)
    for group in GROUPS:
        wanted = [n for n in group if n in names]
        if any(CONFIGS[n][0] == "terratorch" for n in wanted) and not os.path.exists(args.tt_python):
            print(f"TerraTorch skipped: {args.tt_python} not found")
            wanted = [n for n in wanted if CONFIGS[n][0] != "terratorch"]
        if not wanted:
            continue
        workers = [_Worker(args.tt_python if CONFIGS[n][0] == "terratorch" else sys.executable, n, args.threads)
                   for n in wanted]
        for _ in range(args.steps):
            for w in workers:
                w.step()
        for w in workers:
            r = results[w.name] = w.finish()
            dtype = "bf16" if CONFIGS[w.name][1] == "bf16" or r["float32_matmul_precision"] != "highest" else "fp32"
            r["gflops_per_s"] = flops / r["min_s"] / 1e9
            r["of_peak"] = flops / r["min_s"] / peak[dtype]
            print(f"{w.name:24s} step median {r['median_s']:.2f} s, best {r['min_s']:.2f} s (CPU {r['median_cpu_s']:.2f} s)"
                  f"  peak RSS {r['peak_rss_gb']:.2f} GB  {r['gflops_per_s']:.0f} GFLOP/s = {100 * r['of_peak']:.0f}% of "
                  f"{dtype} matmul peak  fp32 matmuls: {r['float32_matmul_precision']}  loss {r['runs'][-1]['loss']:.4f}",
                  flush=True)
    for ours_name, theirs_name in (("encdec-fp32", "terratorch-fp32-highest"), ("encdec-fp32", "terratorch-fp32"),
                                   ("encdec-bf16", "terratorch-bf16"), ("encdec-bf16-compile", "terratorch-bf16"),
                                   ("encdec-bf16", "terratorch-fp32")):
        ours, theirs = results.get(ours_name), results.get(theirs_name)
        if ours and theirs:
            paired = any(ours_name in g and theirs_name in g for g in GROUPS)
            pairs = [t["wall"] / o["wall"] for o, t in zip(ours["runs"], theirs["runs"])]
            cpu = [t["cpu"] / o["cpu"] for o, t in zip(ours["runs"], theirs["runs"])]
            note = (f"{statistics.median(pairs):.2f}x median of paired steps (CPU {statistics.median(cpu):.2f}x), "
                    if paired else "")
            print(f"{theirs_name} / {ours_name} step time: {note}{theirs['min_s'] / ours['min_s']:.2f}x best vs best; "
                  f"peak RSS {ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}x theirs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
