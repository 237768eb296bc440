"""The NCCL calls our code would make on GPUs, checked on CPU by recording them.

NCCL hazards no CPU run meets: a barrier without ``device_ids`` lets NCCL guess the rank's GPU (the FSDP2 hang
under Ray Train, ray-project/ray#57860), and the collective timeout must be the recipe's ``train.pg_timeout_s``
everywhere a group or DeepSpeed's communication backend is made. ``torch.distributed`` (and DeepSpeed's
``comm.init_distributed``) are replaced by recorders here: what is tested is our call sites' arguments.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import torch
import torch.distributed as dist

from encdec.distributed import barrier, init_process_group, make_strategy
from encdec.distributed.process_group import DEFAULT_PG_TIMEOUT_S


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, name: str, result: Any = None) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return result

        return record

    def named(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(a, k) for n, a, k in self.calls if n == name]


@pytest.fixture
def nccl(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """A 4-GPU machine seen by local rank 3 of 8, with an initialised NCCL group whose calls are recorded."""
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", rec("set_device"))
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(dist, "barrier", rec("barrier"))
    monkeypatch.setattr(dist, "broadcast_object_list", rec("broadcast_object_list"))
    for key, value in {"LOCAL_RANK": "3", "RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    return rec


def test_init_binds_the_group_to_the_local_gpu_with_the_recipe_timeout(nccl: _Recorder,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", nccl("init_process_group"))
    assert init_process_group("nccl", timeout_s=600) is True
    assert nccl.named("set_device") == [((torch.device("cuda", 3),), {})]
    ((_, kwargs),) = nccl.named("init_process_group")
    assert kwargs == {"backend": "nccl", "timeout": datetime.timedelta(seconds=600),
                      "device_id": torch.device("cuda", 3)}


def test_gloo_init_takes_the_timeout_and_no_device(nccl: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", nccl("init_process_group"))
    init_process_group("gloo", timeout_s=75)
    ((_, kwargs),) = nccl.named("init_process_group")
    assert kwargs == {"backend": "gloo", "timeout": datetime.timedelta(seconds=75)}
    assert not nccl.named("set_device")
    assert DEFAULT_PG_TIMEOUT_S == 1800.0  # torch's default when the recipe says nothing


def test_barriers_name_the_device_on_nccl(nccl: _Recorder) -> None:
    barrier()  # no device given: this rank's GPU (LOCAL_RANK 3 of 4 visible)
    barrier(torch.device("cuda", 1))
    strategy = make_strategy("none", device="cuda:2")
    strategy.barrier()
    assert [k for _, k in nccl.named("barrier")] == [{"device_ids": [3]}, {"device_ids": [1]}, {"device_ids": [2]}]


def test_barrier_on_gloo_passes_no_device(nccl: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    make_strategy("none", device="cpu").barrier()
    assert nccl.named("barrier") == [((), {})]


def test_checkpoint_collectives_use_the_device(nccl: _Recorder, tmp_path: Any) -> None:
    """The atomic checkpoint directory's barriers and the best-record broadcast go through the strategy."""
    from encdec.train.checkpoint import CheckpointManager

    strategy = make_strategy("none", device="cuda:2")
    strategy.broadcast_object({"step": 1})
    ((_, kwargs),) = nccl.named("broadcast_object_list")
    assert kwargs == {"src": 0, "device": torch.device("cuda", 2)}
    # a round-1 checkpoint has no best in its extra: rank 0's best.json is broadcast (here: rank 3 gets None)
    assert CheckpointManager(tmp_path, best_metric="val/mIoU").restore_best({}, strategy) is None
    assert len(nccl.named("broadcast_object_list")) == 2


def test_strategy_options_carry_the_recipe_timeout() -> None:
    from encdec.config import TrainSection
    from encdec.train.loop_parts import strategy_options
    from encdec.train.optim import build_optimizer

    train = TrainSection(max_steps=10, strategy="deepspeed", pg_timeout_s=900)
    opts = strategy_options(train, peft=False, global_batch_size=8, grad_accum=1, world_size=2)
    assert opts["pg_timeout_s"] == 900.0 and opts["optimizer_factory"] is build_optimizer
    strategy = make_strategy("deepspeed", **opts)
    assert strategy.pg_timeout_s == 900.0


def test_deepspeed_comm_and_its_own_group_get_the_timeout(nccl: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed import comm

    from encdec.distributed import deepspeed as ds

    monkeypatch.setattr(comm, "init_distributed", nccl("ds_init_distributed"))
    ds.init_deepspeed_comm(900)
    ((_, kwargs),) = nccl.named("ds_init_distributed")
    assert kwargs == {"dist_backend": "nccl", "dist_init_required": False,
                      "timeout": datetime.timedelta(seconds=900)}

    # alone (no group described), DeepSpeed's strategy makes its 1-rank group with the same timeout
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", nccl("init_process_group"))
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key)
    ds._ensure_process_group(900)
    ((_, kwargs),) = nccl.named("init_process_group")
    assert kwargs["timeout"] == datetime.timedelta(seconds=900)
