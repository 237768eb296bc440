"""GPU check (not collected by pytest; CI has no GPU): the strategies' NCCL call sites on a real CUDA device.

One rank on one GPU (NCCL refuses two ranks on one device), so this checks what the CPU tests cannot: NCCL
accepts the calls our code makes (a group bound to its device, barriers with ``device_ids``, DDP's summing comm
hook, FSDP2 with divide factor 1 and sum-only reductions, DCP save/load, the best-record broadcast), and NCCL
never has to guess a barrier's device. Run from the repository root on a machine with a GPU:

    python tests/gpu/check_nccl_strategies.py

Prints one JSON line per check and exits non-zero on a failed one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEVICE = os.environ.get("CHECK_DEVICE", "cuda:0")  # "cpu": a gloo dry run of this script


class Tiny(nn.Module):
    """Two sharding units and a head; a frozen first layer (what bf16 storage and adapter-only runs see)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.stem.requires_grad_(False)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2)])
        self.head = nn.Linear(32, 4)

    def sharding_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def run(name: str, precision: str, ckpt: Path) -> dict[str, object]:
    from encdec.distributed import make_strategy
    from encdec.train.optim import build_optimizer

    torch.manual_seed(0)
    model = Tiny()
    strategy = make_strategy(name, optimizer_factory=build_optimizer, device=DEVICE, pg_timeout_s=120)
    cast = strategy.store_frozen_weights(model, precision)
    strategy.setup(model, {"name": "adamw", "lr": 1e-2, "grad_clip": 1.0}, precision=precision, grad_accum=2,
                   activation_checkpointing=False)
    losses, norms = [], []
    for step in range(4):
        total = 0.0
        for micro in range(2):
            g = torch.Generator().manual_seed(step * 10 + micro)
            x, y = torch.randn(8, 16, generator=g).to(DEVICE), torch.randint(0, 4, (8,), generator=g).to(DEVICE)
            with strategy.no_sync(is_last_micro=micro == 1), strategy.autocast():
                loss = nn.functional.cross_entropy(strategy.model(x).float(), y)
            strategy.backward(loss / (2 * strategy.world_size))
            total += float(loss.detach()) / 2
        norms.append(strategy.step(max_norm=1.0))
        losses.append(total)
        if step == 1:
            strategy.save(ckpt, {"step": 2})
    resumed = make_strategy(name, optimizer_factory=build_optimizer, device=DEVICE)
    torch.manual_seed(1)
    other = Tiny()
    resumed.store_frozen_weights(other, precision)
    resumed.setup(other, {"name": "adamw", "lr": 1e-2, "grad_clip": 1.0}, precision=precision, grad_accum=2,
                  activation_checkpointing=False)
    extra = resumed.load(ckpt)
    state = strategy.full_state_dict() or {}
    return {"strategy": name, "precision": precision, "losses": losses, "norms": norms, "frozen_cast": cast,
            "resumed_step": extra["step"], "weights_sum": float(sum(v.double().sum() for v in state.values()))}


def main() -> int:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    from encdec.distributed import init_process_group, make_strategy
    from encdec.train.checkpoint import CheckpointManager

    barriers: list[dict[str, object]] = []
    real_barrier = dist.barrier

    def recording_barrier(*args: object, **kwargs: object) -> object:
        barriers.append({k: v for k, v in kwargs.items() if k == "device_ids"})
        return real_barrier(*args, **kwargs)

    dist.barrier = recording_barrier  # type: ignore[assignment]
    failed = 0
    assert init_process_group("nccl" if DEVICE.startswith("cuda") else "gloo", timeout_s=120)
    name = torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else "cpu"
    print(json.dumps({"check": "init", "backend": dist.get_backend(), "device": name}))
    tmp = Path(tempfile.mkdtemp())
    results = {}
    for precision in ("fp32", "bf16") if DEVICE.startswith("cuda") else ("fp32",):
        for name in ("none", "ddp", "fsdp"):
            out = run(name, precision, tmp / f"{name}-{precision}")
            results[(name, precision)] = out
            print(json.dumps(out))
    for precision, rtol in (("fp32", 1e-5), ("bf16", 2e-2)) if DEVICE.startswith("cuda") else (("fp32", 1e-5),):
        ref = results[("none", precision)]["losses"]
        for name in ("ddp", "fsdp"):
            got = results[(name, precision)]["losses"]
            worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))  # type: ignore[arg-type]
            ok = worst <= rtol
            failed += not ok
            print(json.dumps({"check": f"{name} {precision} == none", "worst_rel": worst, "ok": ok}))
    strategy = make_strategy("none", device=DEVICE)
    got = CheckpointManager(tmp / "m", best_metric="val/mIoU").restore_best({}, strategy)  # broadcast path
    print(json.dumps({"check": "restore_best broadcast", "got": got}))
    want = [0] if DEVICE.startswith("cuda") else None
    ok = bool(barriers) and all(b.get("device_ids") == want for b in barriers)
    failed += not ok
    print(json.dumps({"check": "every barrier named the device", "barriers": len(barriers), "ok": ok}))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
