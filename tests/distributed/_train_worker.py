"""A small, complete training run on any strategy, used by the strategy tests in every rank (and in-process).

The data of step ``s`` is a fixed global batch drawn from a generator seeded by ``s % 2``; rank ``r`` of ``w`` takes
the samples ``(m * w + r) * b ... + b`` for micro-batch ``m``, so every world size / accumulation setting sees
the same global batch. Losses are reported as the global mean (all-reduced over ranks), comparable with a
single-process run.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

IMG = 32
BANDS = 6
CLASSES = 3


def make_model(kind: str, seed: int = 0, *, plain: bool = False) -> nn.Module:
    """A tiny segmentation model built by the real factory (norms without batch statistics).

    ``plain=True`` builds a PEFT model without its ``peft_config`` (what a consolidated export loads into).
    """
    from encdec import build_model

    torch.manual_seed(seed)
    if kind == "cnn":  # timm CNN (LayerNorm) + FCN decoder with frozen BatchNorm
        # not GroupNorm: the FCN convs before it keep a bias whose true gradient is 0, and Adam turns the rounding
        # noise of that 0 into updates of +-lr that differ between runs
        return build_model(
            "segmentation",
            backbone="timm_test_convnext",
            backbone_in_chans=BANDS,
            decoder="FCNDecoder",
            decoder_norm="frozen_batch",
            decoder_num_convs=2,
            decoder_channels=16,
            num_classes=CLASSES,
        )
    if kind == "cnn_bn":  # the same with TerraTorch's default BatchNorm: per-rank statistics, no exact parity
        return build_model(
            "segmentation",
            backbone="timm_test_convnext",
            backbone_in_chans=BANDS,
            decoder="FCNDecoder",
            decoder_norm="batch",
            decoder_num_convs=2,
            decoder_channels=16,
            num_classes=CLASSES,
        )
    if kind == "cnn_smp":  # timm CNN + smp Unet decoder without norms (smp defaults to BatchNorm)
        return build_model(
            "segmentation",
            backbone="timm_test_convnext",
            backbone_in_chans=BANDS,
            decoder="smp_Unet",
            decoder_decoder_channels=[16, 16, 8],
            decoder_decoder_use_norm="identity",
            num_classes=CLASSES,
        )
    if kind == "vit_lora":  # tiny Prithvi (transformer blocks = sharding units) + LoRA on q/v + UperNet
        return build_model(
            "segmentation",
            backbone="prithvi_eo_tiny",
            backbone_pretrained=False,
            backbone_img_size=IMG,
            necks=[
                {"name": "SelectIndices", "indices": [0, 1, 2, 3]},
                {"name": "ReshapeTokensToImage"},
                {"name": "LearnedInterpolateToPyramidal", "norm": "frozen_batch"},
            ],
            decoder="UperNetDecoder",
            decoder_channels=16,
            decoder_norm="frozen_batch",
            num_classes=CLASSES,
            peft_config=None if plain else {
                "method": "LORA",
                "replace_qkv": "qkv",
                "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 4, "lora_alpha": 8},
            },
        )
    raise ValueError(f"unknown test model kind {kind!r}")


def meta_model(kind: str) -> nn.Module:
    """The same model built on the meta device (no memory; for exports that need an unsharded copy)."""
    with torch.device("meta"):
        return make_model(kind)


def global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed global batch of optimizer step ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, BANDS, IMG, IMG, generator=g)
    # a learnable target (which of the first bands is brightest in each 16 px patch), so "the loss falls" is a
    # real check
    y = F.interpolate(F.avg_pool2d(x[:, :CLASSES], 16), scale_factor=16.0, mode="nearest").argmax(1)
    return x, y


def micro_batch(step: int, micro: int, rank: int, world: int, global_size: int, accum: int) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s part of micro-batch ``micro`` of step ``step``."""
    x, y = global_batch(step % 2, global_size)  # two batches alternate: a tiny model fits them in a few steps
    b = global_size // (world * accum)
    start = (micro * world + rank) * b
    return x[start : start + b], y[start : start + b]


OPTIM = {"name": "adamw", "lr": 2e-3, "weight_decay": 0.01, "grad_clip": 1.0}


def train_run(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec["steps"]`` steps (optionally resuming / saving); returns losses, grad norms, final weights.

    spec keys: strategy, opts (make_strategy options), model, steps, global_batch, grad_accum, precision,
    save_at (step after which to save), ckpt_dir, resume (checkpoint dir), resume_also (re-run from the
    checkpoint in the same processes after finishing), activation_checkpointing, export (safetensors path).
    """
    from encdec.distributed import make_strategy
    from encdec.train.optim import build_optimizer

    def one_run(resume: str | None) -> dict[str, Any]:
        strategy = make_strategy(spec["strategy"], optimizer_factory=build_optimizer, **spec.get("opts", {}))
        model = make_model(spec["model"], spec.get("seed", 0))
        accum = spec.get("grad_accum", 1)
        optim = {**OPTIM, **spec.get("optim", {})}
        strategy.setup(
            model,
            optim,
            precision=spec.get("precision", "fp32"),
            grad_accum=accum,
            activation_checkpointing=spec.get("activation_checkpointing", False),
        )
        start = 0
        if resume:
            extra = strategy.load(resume)
            start = int(extra["step"])
            torch.set_rng_state(extra["rng"])
        losses, norms = [], []
        strategy.model.train()
        for step in range(start, spec["steps"]):
            total = torch.zeros(())
            for m in range(accum):
                x, y = micro_batch(step, m, rank, world, spec["global_batch"], accum)
                x = x.to(strategy.device)
                with strategy.no_sync(is_last_micro=m == accum - 1), strategy.autocast():
                    out = strategy.model(x).output
                    loss = F.cross_entropy(out.float(), y.to(strategy.device))
                # each rank's micro-batch mean, normalised for the global batch (equal-sized parts): the
                # strategies sum what backward receives over micro-batches and ranks
                strategy.backward(loss / (accum * world))
                total += loss.detach().float().cpu()
            norms.append(strategy.step(max_norm=optim["grad_clip"]))
            mean = total / accum
            if dist.is_initialized():
                dist.all_reduce(mean)
                mean /= world
            losses.append(float(mean))
            if spec.get("save_at") == step + 1 and not resume:
                strategy.save(spec["ckpt_dir"], {"step": step + 1, "rng": torch.get_rng_state()})
        result: dict[str, Any] = {"losses": losses, "norms": norms, "start": start}
        result["state"] = strategy.full_state_dict()
        if spec.get("export"):
            from encdec.train.checkpoint import export_consolidated

            export_consolidated(strategy, spec["export"], model_factory=functools.partial(meta_model, spec["model"]))
        result["trainable"] = sorted(strategy.trainable_names())
        return result

    first = one_run(spec.get("resume"))
    if spec.get("resume_also"):
        first["resumed"] = one_run(spec["ckpt_dir"])
    if rank != 0:
        first.pop("state", None)
        first.get("resumed", {}).pop("state", None)
    return first


def train_many(rank: int, world: int, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several ``train_run`` in the same processes (one process start-up for all)."""
    return [train_run(rank, world, spec) for spec in specs]
