"""Each strategy on 2 real gloo processes against one process, with checkpoints, resume and export.

One 2-process run per case does all of this (process start-up dominates the cost on 2 cores):

* 12 optimizer steps with gradient accumulation 2 x micro-batch 2 per rank (global batch 8) must give the
  single-process loss curve (one batch of 8, no accumulation) within 1e-5 relative, and the same grad norms;
* a checkpoint saved after step 6 and loaded into fresh processes (same world size) gives steps 7-12 again;
* the same checkpoint resumed at world size 1 (DCP: by strategy ``none`` in this process; DeepSpeed: a
  1-process DeepSpeed run through the universal checkpoint) gives steps 7-12 too;
* the gathered full state dict equals the single-process weights, and the consolidated export (LoRA merged,
  qkv re-fused) equals the single-process export and loads into a plain ``build_model`` with ``strict=True``.
  Weights are compared with a single-process run of the same micro-batch size (2 x 4 accumulated), to 1e-4
  absolute: conv kernels round differently at batch 2 and 8, and Adam normalises each gradient element, so
  1e-7 rounding differences on near-zero elements (LoRA A right after B leaves 0) become 1e-5..1e-4 weight
  differences within 12 steps while the losses still agree to 1e-6. A sharding or gathering error is O(lr) = 1e-3.

Models have no batch statistics (LayerNorm, frozen BatchNorm), so exact parity holds in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _spawn import run_distributed
from _train_worker import make_model, train_run

pytestmark = pytest.mark.distributed

STEPS, SAVE_AT, GLOBAL_BATCH = 12, 6, 8
RTOL = 1e-5
WEIGHT_ATOL = 1e-4

AC = {"activation_checkpointing": True}
CASES: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    # name: (strategy, make_strategy options, model kind, extra run options)
    "ddp-vit_lora": ("ddp", {}, "vit_lora", {}),
    "fsdp-vit_lora-adapter_only-ac": ("fsdp", {"adapter_only": True}, "vit_lora", AC),
    # every rank builds and shards its own copy (the default, build_on_rank0, is covered by the vit_lora case)
    "fsdp-cnn-every_rank_builds": ("fsdp", {"build_on_rank0": False}, "cnn", {}),
    "zero2-vit_lora-ac": ("deepspeed", {"zero_stage": 2, "micro_batch": 2}, "vit_lora", AC),
    "zero3-vit_lora-adapter_only": ("deepspeed", {"zero_stage": 3, "micro_batch": 2, "adapter_only": True}, "vit_lora", {}),
}


def _close(got: list[float], want: list[float], rtol: float, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} values, expected {len(want)}"
    worst = max(abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want))
    assert worst <= rtol, f"{what}: worst relative difference {worst:.2e} > {rtol:.0e}\n got {got}\nwant {want}"


def _same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:10]}"
    worst, key = max(((got[k].float() - want[k].float()).abs().max().item(), k) for k in want)
    assert worst <= atol, f"{what}: max abs weight difference {worst:.2e} > {atol:.0e} (at {key})"


def _load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _resume_world1(strategy: str, opts: dict[str, Any], model: str, ckpt: Path) -> dict[str, Any]:
    spec = {"strategy": strategy, "opts": opts, "model": model, "steps": STEPS, "global_batch": GLOBAL_BATCH,
            "resume": str(ckpt)}
    if strategy == "deepspeed":  # DeepSpeed needs its own (1-rank) process group: run it in a child
        return run_distributed(train_run, 1, spec, timeout_s=300)[0]
    # DCP checkpoints load into any of none/ddp/fsdp: resume in this process with strategy "none"
    common = {k: v for k, v in opts.items() if k == "adapter_only"}  # the sharding options do not apply to "none"
    return train_run(0, 1, {**spec, "strategy": "none", "opts": common})


@pytest.mark.parametrize("case", list(CASES))
def test_strategy_matches_single_process_and_resumes(
    case: str, tmp_path: Path, reference: Callable[..., dict[str, Any]], request: pytest.FixtureRequest
) -> None:
    strategy, opts, model, extra = CASES[case]
    if strategy == "deepspeed":
        request.getfixturevalue("deepspeed_ops")
    ref = reference(model, STEPS, GLOBAL_BATCH)
    same_micro = reference(model, STEPS, GLOBAL_BATCH, grad_accum=4)
    ckpt = tmp_path / "checkpoints" / f"step_{SAVE_AT:08d}"
    export = tmp_path / "export.safetensors"
    spec = {"strategy": strategy, "opts": opts, "model": model, "steps": STEPS, "global_batch": GLOBAL_BATCH,
            "grad_accum": 2, "save_at": SAVE_AT, "ckpt_dir": str(ckpt), "resume_also": True, "export": str(export),
            **extra}
    rank0, rank1 = run_distributed(train_run, 2, spec, timeout_s=300)

    # parity (accumulation 2 x 2 per rank on 2 ranks == one batch of 8 in one process)
    _close(rank0["losses"], ref["losses"], RTOL, f"{case} losses vs single process")
    _close(rank0["norms"], ref["norms"], 1e-4, f"{case} grad norms vs single process")
    assert rank0["losses"] == rank1["losses"], "ranks disagree on the all-reduced loss"
    losses = rank0["losses"]
    assert sum(losses[-2:]) < 0.95 * sum(losses[:2]), f"{case}: the loss did not fall: {losses}"
    _same_state(rank0["state"], same_micro["state"], WEIGHT_ATOL, f"{case} full_state_dict vs single process")
    assert rank1.get("state") is None

    # resume at the same world size, in fresh strategies
    resumed = rank0["resumed"]
    assert resumed["start"] == SAVE_AT
    _close(resumed["losses"], rank0["losses"][SAVE_AT:], RTOL, f"{case} resumed (2 ranks) vs uninterrupted")

    # resume at world size 1 from the 2-rank checkpoint
    single = _resume_world1(strategy, opts, model, ckpt)
    assert single["start"] == SAVE_AT
    _close(single["losses"], ref["losses"][SAVE_AT:], RTOL, f"{case} resumed at world size 1 vs uninterrupted")

    # consolidated export == the single-process export, loadable into the plain model
    got, want = _load_safetensors(export), _load_safetensors(same_micro["export"])
    _same_state(got, want, WEIGHT_ATOL, f"{case} consolidated export vs single process")
    if model == "vit_lora":
        assert not any("lora" in k or "q_linear" in k for k in got), "export still holds adapters / split qkv"
    plain = make_model(model, plain=True)
    plain.load_state_dict(got, strict=True)


def test_adapter_only_checkpoint_holds_only_trainable_state(tmp_path: Path) -> None:
    """A PEFT run's adapter-only checkpoint has the trainable parameters only (+ their optimizer state)."""
    import torch.distributed.checkpoint as dcp
    from _train_worker import OPTIM

    from encdec.distributed import make_strategy
    from encdec.train.optim import build_optimizer

    full, adapters = tmp_path / "full", tmp_path / "adapters"
    for path, adapter_only in ((full, False), (adapters, True)):
        strategy = make_strategy("none", adapter_only=adapter_only, optimizer_factory=build_optimizer)
        strategy.setup(make_model("vit_lora"), OPTIM, precision="fp32", grad_accum=1, activation_checkpointing=False)
        strategy.save(path, {"step": 0})
    trainable = set(strategy.trainable_names())
    frozen = {n for n, p in strategy.module.named_parameters() if not p.requires_grad}
    assert trainable and frozen

    def model_keys(path: Path) -> set[str]:
        meta = dcp.FileSystemReader(str(path / "state")).read_metadata()
        return {k[len("model.") :] for k in meta.state_dict_metadata if k.startswith("model.")}

    assert trainable <= model_keys(adapters)
    assert not frozen & model_keys(adapters)
    assert frozen <= model_keys(full)
    size = {p: sum(f.stat().st_size for f in (p / "state").iterdir()) for p in (full, adapters)}
    assert size[adapters] < size[full] / 3, size
