"""The pure DeepSpeed config function: recipe values land in DeepSpeed's own settings; bad values are named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from encdec.distributed import StrategyError
from encdec.distributed.deepspeed import (
    DEFAULT_UNIT_NUMEL,
    deepspeed_config,
    largest_unit_numel,
    release_grad_pages,
)

OPTIM = {"name": "adamw", "lr": 3e-4, "weight_decay": 0.05, "grad_clip": 1.0, "grad_accum": 4}


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_recipe_values_map_to_deepspeed_settings(stage: int, precision: str) -> None:
    before = copy.deepcopy(OPTIM)
    cfg = deepspeed_config(OPTIM, zero_stage=stage, precision=precision, grad_accum=4, micro_batch=3, grad_clip=1.0)
    assert OPTIM == before, "the function must not modify its input"
    assert cfg == deepspeed_config(OPTIM, zero_stage=stage, precision=precision, grad_accum=4, micro_batch=3,
                                   grad_clip=1.0), "pure: same input, same output"
    json.dumps(cfg)  # DeepSpeed accepts a JSON file too: everything must serialise
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert "train_batch_size" not in cfg, "DeepSpeed derives it from the world size; fixing it here breaks resizes"
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] is (precision == "bf16")
    assert cfg["fp16"]["enabled"] is (precision == "fp16")
    if precision == "fp16":
        assert cfg["fp16"]["loss_scale"] == 0, "fp16 needs dynamic loss scaling"
    assert "optimizer" not in cfg, "the client (torch) optimizer is used unless native_optimizer"
    if stage == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False


def test_no_clipping_and_native_optimizer() -> None:
    cfg = deepspeed_config(OPTIM, zero_stage=2, precision="fp32", grad_accum=1, micro_batch=1, grad_clip=None)
    assert cfg["gradient_clipping"] == 0.0
    native = deepspeed_config(OPTIM, zero_stage=3, precision="bf16", grad_accum=1, micro_batch=1, grad_clip=0.5,
                              native_optimizer=True)
    assert native["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 3e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-8},
    }
    with pytest.raises(StrategyError, match="adamw"):
        deepspeed_config({"name": "sgd"}, zero_stage=3, precision="bf16", grad_accum=1, micro_batch=1,
                         grad_clip=None, native_optimizer=True)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"zero_stage": 1}, "zero_stage"),
        ({"precision": "auto"}, "precision"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"micro_batch": 2.5}, "micro_batch"),
        ({"grad_clip": -1.0}, "grad_clip"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    args = {"zero_stage": 3, "precision": "bf16", "grad_accum": 1, "micro_batch": 1, "grad_clip": 1.0, **kwargs}
    with pytest.raises(StrategyError, match=field):
        deepspeed_config(OPTIM, **args)


def test_stage3_buffers_are_sized_from_the_largest_unit() -> None:
    unit = 12_596_224  # one Prithvi-EO-2.0 300M block
    zero = deepspeed_config(OPTIM, zero_stage=3, precision="fp32", grad_accum=1, micro_batch=2, grad_clip=1.0,
                            unit_numel=unit)["zero_optimization"]
    # DeepSpeed's defaults (sub_group_size 1e12, 5e8-element buckets, 1e9 live parameters) step the optimizer over
    # the whole flat partition at once and keep the whole model gathered: all bounded by a unit or two here
    assert zero["sub_group_size"] == unit
    assert zero["reduce_bucket_size"] == unit
    assert zero["stage3_prefetch_bucket_size"] == unit
    assert zero["stage3_max_live_parameters"] == 2 * unit
    assert zero["stage3_max_reuse_distance"] == 2 * unit
    small = deepspeed_config(OPTIM, zero_stage=3, precision="fp32", grad_accum=1, micro_batch=2, grad_clip=1.0,
                             unit_numel=1000)["zero_optimization"]
    assert small["sub_group_size"] == 1000 and small["stage3_max_live_parameters"] == 2000
    default = deepspeed_config(OPTIM, zero_stage=3, precision="fp32", grad_accum=1, micro_batch=2, grad_clip=1.0)
    assert default["zero_optimization"]["sub_group_size"] == DEFAULT_UNIT_NUMEL
    stage2 = deepspeed_config(OPTIM, zero_stage=2, precision="fp32", grad_accum=1, micro_batch=2, grad_clip=1.0,
                              unit_numel=unit)["zero_optimization"]
    assert "sub_group_size" not in stage2, "stage 2 has no sub-groups; its buckets keep their own sizes"


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "12M"])
def test_bad_unit_numel_is_named(bad: object) -> None:
    with pytest.raises(StrategyError, match="unit_numel"):
        deepspeed_config(OPTIM, zero_stage=3, precision="fp32", grad_accum=1, micro_batch=1, grad_clip=None,
                         unit_numel=bad)  # type: ignore[arg-type]


def test_largest_unit_numel_reads_sharding_units() -> None:
    class WithUnits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 16)])
            self.head = nn.Linear(16, 2)

        def sharding_units(self) -> list[nn.Module]:
            return list(self.blocks)

    assert largest_unit_numel(WithUnits()) == 4 * 16 + 16
    assert largest_unit_numel(nn.Linear(3, 3)) is None, "no sharding_units: the config falls back to its default"


class _Blocks(nn.Module):
    """A tiny model with sharding units, so ZeRO-3 splits its partition into several optimizer sub-groups."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 512), nn.GELU(), nn.Linear(512, 16)) for _ in range(3)])
        self.head = nn.Linear(16, 4)

    def sharding_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _zero3_fp32_run(rank: int, world: int, ckpt: str) -> dict[str, object]:
    """ZeRO-3 fp32 next to strategy 'none': shared master storage, same steps, same checkpoint continuation."""
    from encdec.distributed import make_strategy
    from encdec.train.optim import build_optimizer

    optim = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.05, "grad_clip": 1.0}

    def build(name: str, seed: int):
        torch.manual_seed(seed)
        opts = {"zero_stage": 3, "micro_batch": 8} if name == "deepspeed" else {}
        strategy = make_strategy(name, optimizer_factory=build_optimizer, **opts)
        strategy.setup(_Blocks(), optim, precision="fp32", grad_accum=1, activation_checkpointing=False)
        return strategy

    def train(strategy, steps: range) -> list[float]:
        losses = []
        for i in steps:
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
            loss = torch.nn.functional.cross_entropy(strategy.model(x), y)
            strategy.backward(loss)
            strategy.step(max_norm=1.0)
            losses.append(loss.item())
        return losses

    def shared(strategy) -> list[bool]:
        zero = strategy.model.optimizer
        return [m.data_ptr() == p.data_ptr() for m, p in
                zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat)]

    ds, ref = build("deepspeed", 0), build("none", 0)
    out: dict[str, object] = {"shared_at_setup": shared(ds)}
    out["losses"], out["ref_losses"] = train(ds, range(3)), train(ref, range(3))
    # between steps the gradient partition's pages are handed back (release_grad_pages): it reads as zeros
    out["grads_released"] = bool((ds.model.optimizer.grad_partitions_flat_buffer == 0).all())
    out["released_bytes"] = release_grad_pages(ds.model.optimizer)  # 200 KB: whole pages go through madvise
    ds.save(ckpt, {"step": 3})
    out["losses"] += train(ds, range(3, 5))
    out["ref_losses"] += train(ref, range(3, 5))
    resumed = build("deepspeed", 1)  # other initial weights: everything must come from the checkpoint
    resumed.load(ckpt)
    out["resumed_losses"] = train(resumed, range(3, 5))
    out["shared_after_load"] = shared(resumed)
    out["state"], out["ref_state"] = ds.full_state_dict(), ref.full_state_dict()
    out["resumed_state"] = resumed.full_state_dict()
    return out


@pytest.mark.distributed
def test_zero3_fp32_shares_master_releases_grads_and_trains_the_same(tmp_path, request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("deepspeed_ops")
    from _spawn import run_distributed

    out = run_distributed(_zero3_fp32_run, 1, str(tmp_path / "ckpt"), timeout_s=300)[0]
    # DeepSpeed keeps a second fp32 copy of the partition unless the strategy aliases it (see
    # share_stage3_fp32_master): several sub-groups here, all shared, also after a checkpoint load
    assert len(out["shared_at_setup"]) > 1, "expected several optimizer sub-groups from the sharding units"
    assert all(out["shared_at_setup"]) and all(out["shared_after_load"])
    assert out["grads_released"] and out["released_bytes"] > 0
    assert out["losses"] == pytest.approx(out["ref_losses"], rel=1e-5)
    assert out["resumed_losses"] == pytest.approx(out["losses"][3:], rel=1e-6)
    for key, want in out["ref_state"].items():
        torch.testing.assert_close(out["state"][key], want, rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(out["resumed_state"][key], out["state"][key], rtol=1e-6, atol=1e-6, msg=key)
