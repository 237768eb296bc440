"""Checkpoint bookkeeping (one process): atomic writes, latest complete, keep-last-k + best, clear errors.

A crash while writing is simulated for real: the save raises half-way (an ``extra`` that cannot be pickled,
after the model state has been written), leaving a ``.tmp-`` directory behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from encdec.distributed import StrategyError, make_strategy
from encdec.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    find_latest_checkpoint,
    is_complete,
    list_checkpoints,
    read_meta,
)
from encdec.train.optim import build_optimizer

OPTIM = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}


def _strategy(seed: int = 0, **opts: object):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    strategy = make_strategy("none", optimizer_factory=build_optimizer, **opts)
    strategy.setup(model, OPTIM, precision="fp32", grad_accum=1, activation_checkpointing=False)
    return strategy


def _train(strategy, steps: int) -> None:
    for i in range(steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
        strategy.backward(strategy.model(x).pow(2).mean())
        strategy.step(max_norm=None)


def _weights(strategy) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in strategy.module.state_dict().items()}


def test_save_load_round_trip_restores_model_optimizer_and_extra(tmp_path: Path) -> None:
    a = _strategy()
    _train(a, 3)
    rng = torch.get_rng_state()
    a.save(tmp_path / "step_00000003", {"step": 3, "note": "x", "rng": rng})
    saved = _weights(a)
    _train(a, 2)  # the uninterrupted run continues
    after = _weights(a)

    b = _strategy(seed=1)  # different initial weights: everything must come from the checkpoint
    extra = b.load(tmp_path / "step_00000003")
    assert extra["step"] == 3 and extra["note"] == "x"
    assert torch.equal(extra["rng"], rng)
    for k, v in saved.items():
        assert torch.equal(_weights(b)[k], v), k
    _train(b, 2)  # identical continuation needs the Adam moments too
    for k, v in after.items():
        assert torch.equal(_weights(b)[k], v), k
    meta = read_meta(tmp_path / "step_00000003")
    assert meta["format"] == "dcp" and meta["world_size"] == 1 and meta["step"] == 3


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    s = _strategy()
    _train(s, 1)
    manager.save(s, 1, {})
    with pytest.raises(Exception):  # torch.save cannot pickle a lambda: the save dies after the DCP shards
        manager.save(s, 2, {"bad": lambda: None})
    partial = tmp_path / ".tmp-step_00000002"
    assert partial.is_dir() and (partial / "state").is_dir(), "the simulated crash should leave a partial dir"
    assert not (tmp_path / "step_00000002").exists()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000001"

    # a directory with the final name but no completed meta.json (e.g. copied half-way) is ignored as well
    fake = tmp_path / "step_00000009"
    shutil.copytree(tmp_path / "step_00000001", fake)
    (fake / "meta.json").unlink()
    assert not is_complete(fake)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    with pytest.raises(CheckpointError, match="incomplete"):
        s.load(fake)

    # the next save of the same step replaces the leftover; cleanup_partial removes the rest
    manager.save(s, 2, {})
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert not partial.exists()
    manager.save(s, 2, {"again": True})  # re-saving an existing step swaps it in atomically
    assert s.load(tmp_path / "step_00000002")["again"] is True
    (tmp_path / ".tmp-step_00000007").mkdir()
    assert manager.cleanup_partial() == [tmp_path / ".tmp-step_00000007"]


def test_keep_last_k_and_best_by_metric(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, best_metric="miou", best_mode="max")
    s = _strategy()
    values = {1: 0.2, 2: 0.7, 3: 0.4, 4: 0.5, 5: 0.3}
    for step, miou in values.items():
        _train(s, 1)
        manager.save(s, step, {}, metrics={"miou": miou, "loss": 1.0})
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert manager.best() == tmp_path / "step_00000002"
    assert manager.best_info() == {"step": 2, "metric": "miou", "value": 0.7}
    assert manager.latest() == tmp_path / "step_00000005"

    low = CheckpointManager(tmp_path / "min", keep_last=1, best_metric="loss", best_mode="min")
    for step, loss in ((1, 0.9), (2, 0.5), (3, 0.8)):
        low.save(s, step, {}, metrics={"loss": loss})
    assert [step for step, _ in list_checkpoints(tmp_path / "min")] == [2, 3]
    assert json.loads((tmp_path / "min" / "best.json").read_text())["step"] == 2


def test_resume_into_other_dcp_strategies_and_bad_inputs(tmp_path: Path) -> None:
    s = _strategy()
    _train(s, 2)
    s.save(tmp_path / "ck", {"step": 2})
    with pytest.raises(CheckpointError, match="does not exist"):
        s.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(StrategyError, match="Did you mean 'fsdp'"):
        make_strategy("fsdb")
    with pytest.raises(StrategyError, match="zero_stage"):
        make_strategy("deepspeed", zero_stage=1)
    with pytest.raises(StrategyError, match="unsupported option"):
        make_strategy("ddp", zero_stage=3)
    with pytest.raises(StrategyError, match="optimizer_factory"):
        make_strategy("none").setup(nn.Linear(2, 2), OPTIM, precision="fp32", grad_accum=1,
                                    activation_checkpointing=False)
    fresh = make_strategy("none", optimizer_factory=build_optimizer)
    with pytest.raises(StrategyError, match="auto"):
        fresh.setup(nn.Linear(2, 2), OPTIM, precision="auto", grad_accum=1, activation_checkpointing=False)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(StrategyError, match="no trainable parameters"):
        fresh.setup(frozen, OPTIM, precision="fp32", grad_accum=1, activation_checkpointing=False)
    with pytest.raises(StrategyError, match="setup"):
        _ = make_strategy("none").optimizer
    # DDP/FSDP without a process group say how to get one
    with pytest.raises(StrategyError, match="init_process_group"):
        make_strategy("fsdp", optimizer_factory=build_optimizer).setup(nn.Linear(2, 2), OPTIM, precision="fp32", grad_accum=1,
                                    activation_checkpointing=False)


def test_best_comes_from_memory_and_the_checkpoint_not_best_json(tmp_path: Path) -> None:
    """A stale best.json (what one rank of a job may read from a bucket) changes no decision; rank 0 rewrites it;
    a resumed manager takes the best from the checkpoint's own extra."""
    manager = CheckpointManager(tmp_path, keep_last=1, best_metric="miou", best_mode="max")
    s = _strategy()
    _train(s, 1)
    manager.save(s, 1, {}, metrics={"miou": 0.3})
    (tmp_path / "best.json").write_text(json.dumps({"step": 1, "metric": "miou", "value": 99.0}))
    assert manager.is_best({"miou": 0.5}), "decided from the in-memory best (0.3), not the file (99)"
    manager.save(s, 2, {}, metrics={"miou": 0.5})
    manager.save(s, 3, {}, metrics={"miou": 0.4})
    assert json.loads((tmp_path / "best.json").read_text()) == {"step": 2, "metric": "miou", "value": 0.5}
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3]

    (tmp_path / "best.json").write_text("{corrupt")
    resumed = CheckpointManager(tmp_path, keep_last=1, best_metric="miou", best_mode="max")
    extra = s.load(tmp_path / "step_00000003")
    assert resumed.restore_best(extra, s) == {"step": 2, "metric": "miou", "value": 0.5}
    assert not resumed.is_best({"miou": 0.45}) and resumed.is_best({"miou": 0.6})
    other = CheckpointManager(tmp_path, best_metric="loss", best_mode="min")  # the recipe now ranks by loss
    assert other.restore_best(extra, s) is None
