"""Cost of the qkv split under LoRA: split q/k/v (what ``replace_qkv`` builds) vs fused qkv + LoRA delta.

One training step = forward + backward + AdamW step on the trainable parameters (LoRA on q and v, a linear head
on the mean token of the last block). Both forms start from the same weights and give the same loss; the
variants are timed interleaved (A, B, A, B...) so a busy shared CPU slows both alike, and the median is kept.

    nice python benchmarks/peft_split_cost.py --backbone prithvi_eo_tiny --batch 2 --iters 5
    nice python benchmarks/peft_split_cost.py --backbone prithvi_eo_v2_300 --batch 1 --iters 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import encdec.models  # noqa: F401  (registers the backbones)
from encdec.models.peft import get_peft_backbone
from encdec.registry import BACKBONE_REGISTRY


class FusedQKVLoRA(nn.Module):
    """The alternative form: the fused ``Linear(D, 3D)`` frozen, LoRA deltas added to the q and v slices."""

    def __init__(self, fused: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        d = fused.in_features
        self.qkv = fused.requires_grad_(False)
        self.scaling = alpha / r
        self.q_a, self.q_b = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        self.v_a, self.v_b = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.q_b.weight)
        nn.init.zeros_(self.v_b.weight)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q + self.q_b(self.q_a(x)) * self.scaling
        v = v + self.v_b(self.v_a(x)) * self.scaling
        return torch.cat([q, k, v], dim=-1)


class Probe(nn.Module):
    """Encoder + linear head on the mean token of the last feature."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_channels[-1], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x)[-1].mean(dim=1)).squeeze(-1)


def build(backbone: str, form: str, r: int, alpha: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    enc = BACKBONE_REGISTRY.build(backbone)
    if form == "split":
        get_peft_backbone(
            {"method": "LORA", "replace_qkv": "qkv",
             "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": r, "lora_alpha": alpha}},
            enc,
        )
    else:
        enc.requires_grad_(False)
        for blk in enc.blocks:
            blk.attn.qkv = FusedQKVLoRA(blk.attn.qkv, r, alpha)
    torch.manual_seed(seed + 1)
    return Probe(enc)


def step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[float, float]:
    """One training step; returns (wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def layer_cost(dim: int, tokens: int, r: int, iters: int) -> dict[str, float]:
    """Median CPU seconds of forward+backward through the qkv layer alone (input grad on, as inside a block)."""
    from peft import LoraConfig, inject_adapter_in_model

    from encdec.models.peft import QKVSep

    torch.manual_seed(0)
    holder = nn.Module()
    holder.qkv = QKVSep.from_linear(nn.Linear(dim, 3 * dim))
    inject_adapter_in_model(LoraConfig(target_modules=["qkv.q_linear", "qkv.v_linear"], r=r, lora_alpha=r), holder)
    forms = {"split": holder.qkv, "fused": FusedQKVLoRA(nn.Linear(dim, 3 * dim), r, float(r))}
    x = torch.randn(1, tokens, dim, requires_grad=True)
    cpu: dict[str, list[float]] = {"split": [], "fused": []}
    for i in range(iters + 3):
        for name, layer in forms.items():
            c0 = time.process_time()
            layer(x).sum().backward()
            if i >= 3:  # warm-up
                cpu[name].append(time.process_time() - c0)
    return {name: statistics.median(t) for name, t in cpu.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="prithvi_eo_tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=5, help="timed steps per form (after one warm-up step each)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--layer-iters", type=int, default=100, help="timed passes through the qkv layer alone")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {form: build(args.backbone, form, args.r, float(args.r), 0) for form in ("split", "fused")}
    models["fused"].head.load_state_dict(models["split"].head.state_dict())
    opts = {f: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3) for f, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 6, args.img_size, args.img_size, generator=gen)
    y = torch.randn(args.batch, generator=gen)
    with torch.no_grad():
        diff = (models["split"](x) - models["fused"](x)).abs().max().item()
    times: dict[str, list[float]] = {"split": [], "fused": []}
    cpu: dict[str, list[float]] = {"split": [], "fused": []}
    for f in models:  # warm-up
        step(models[f], opts[f], x, y)
    for _ in range(args.iters):
        for f in ("split", "fused"):
            wall, used = step(models[f], opts[f], x, y)
            times[f].append(wall)
            cpu[f].append(used)
    med = {f: statistics.median(t) for f, t in times.items()}
    # CPU seconds of this process: with one thread, what the step costs, little affected by other processes
    # competing for the cores (wall time on a shared machine mostly measures the queue)
    med_cpu = {f: statistics.median(t) for f, t in cpu.items()}
    enc = models["split"].encoder
    layer = layer_cost(enc.out_channels[-1], int(enc.pos_embed.shape[1]), args.r, args.layer_iters)
    trainable = {f: sum(q.numel() for q in m.encoder.parameters() if q.requires_grad) for f, m in models.items()}
    result = {
        "backbone": args.backbone, "batch": args.batch, "img_size": args.img_size, "iters": args.iters,
        "threads": torch.get_num_threads(), "r": args.r, "max_output_diff_at_init": diff,
        "lora_params": trainable, "median_step_s": med, "median_step_cpu_s": med_cpu, "all_step_s": times,
        "all_step_cpu_s": cpu,
        "split_overhead_pct_wall": 100.0 * (med["split"] / med["fused"] - 1.0),
        "split_overhead_pct_cpu": 100.0 * (med_cpu["split"] / med_cpu["fused"] - 1.0),
        # the two forms run back to back, so the ratio within each pair cancels slow drifts of the machine
        "split_overhead_pct_cpu_paired": 100.0 * statistics.median(a / b - 1.0 for a, b in zip(cpu["split"], cpu["fused"])),
        "qkv_layer_cpu_s": layer, "qkv_layer_overhead_pct_cpu": 100.0 * (layer["split"] / layer["fused"] - 1.0),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
