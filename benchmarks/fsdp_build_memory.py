"""Host memory of FSDP2 set-up on rank 1, with and without ``build_on_rank0`` (a measurement, not a test).

Each rank builds the model as ``encdec.train.loop.train`` does (inside ``strategy.build_context()``; weights are
loaded only where ``strategy.meta_build`` is False), then runs ``strategy.setup``. Printed per rank: RSS before
the build, RSS after set-up, and the peak RSS (VmHWM) up to the end of set-up — all in GB — and the sum of all
gathered weights (equal in both modes: the broadcast reproduces the seeded build exactly).

Usage (2 gloo processes)::

    nice .venv/bin/python benchmarks/fsdp_build_memory.py [backbone] [img_size]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "distributed"))  # for _spawn


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def measure(rank: int, world: int, backbone: str, img_size: int, build_on_rank0: bool) -> dict[str, Any]:
    """Build + set up one FSDP2 model on this rank; RSS figures in GB."""
    from encdec.distributed import make_strategy
    from encdec.models import build_model
    from encdec.train.loop_parts import freeze, seed_everything

    before = _status("VmRSS")
    from encdec.config import OptimSection
    from encdec.train.optim import build_optimizer

    strategy = make_strategy("fsdp", build_on_rank0=build_on_rank0, optimizer_factory=build_optimizer)
    seed_everything(0)
    with strategy.build_context():
        net = build_model("segmentation", backbone=backbone, backbone_pretrained=False, backbone_img_size=img_size,
                          necks=[{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}],
                          decoder="FCNDecoder", decoder_channels=64, num_classes=2)
    params = sum(p.numel() for p in net.parameters())
    freeze(net, freeze_backbone=False, freeze_decoder=False)
    strategy.setup(net, OptimSection(name="adamw", lr=1e-4), precision="fp32", grad_accum=1, activation_checkpointing=False)
    after, peak = _status("VmRSS"), _status("VmHWM")  # before the check below gathers every weight
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in strategy.module.parameters())
    digest = float(sum(p.detach().full_tensor().double().sum() for p in strategy.module.parameters()))
    return {"rank": rank, "params": params, "local_params": local, "rss_before_gb": before, "rss_after_gb": after,
            "peak_gb": peak, "weights_sum": digest}


def main() -> None:
    from _spawn import run_distributed

    backbone = sys.argv[1] if len(sys.argv) > 1 else "prithvi_eo_v2_300"
    img = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    for flag in (False, True):
        for r in run_distributed(measure, 2, backbone, img, flag, timeout_s=1200):
            print(f"build_on_rank0={flag} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
