"""DCP checkpoints are read without running code from them (``encdec.distributed.dcp_safe``)."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from encdec.distributed.dcp_safe import SafeDcpLoadPlanner, SafeFileSystemReader, load_dcp_metadata
from encdec.models.safe_load import UnsafeGlobalError


def _save(path: Path) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "extra": {"step": 3, "name": "x"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return state


def _load(path: Path, like: dict) -> dict:
    target = {"model": {k: torch.zeros_like(v) for k, v in like["model"].items()},
              "optim": {"param_groups": [dict(g) for g in like["optim"]["param_groups"]],
                        "state": {k: {n: torch.zeros_like(t) if isinstance(t, torch.Tensor) else t
                                      for n, t in s.items()} for k, s in like["optim"]["state"].items()}},
              "extra": {"step": 0, "name": ""}}
    target["optim"]["param_groups"][0]["lr"] = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=SafeFileSystemReader(str(path)), planner=SafeDcpLoadPlanner(), no_dist=True)
    return target


def test_a_checkpoint_dcp_wrote_loads_unchanged(tmp_path: Path) -> None:
    saved = _save(tmp_path / "ck")
    got = _load(tmp_path / "ck", saved)
    for k, v in saved["model"].items():
        assert torch.equal(got["model"][k], v)
    assert got["optim"]["param_groups"][0]["lr"] == pytest.approx(1e-3)  # a byte item, read back
    assert torch.equal(got["optim"]["state"][0]["exp_avg"], saved["optim"]["state"][0]["exp_avg"])
    assert got["extra"] == {"step": 3, "name": "x"}


class _Evil:
    def __reduce__(self):  # what a crafted .metadata would hold: a call of os.system at load time
        return (os.system, ("touch PWNED",))


def test_a_crafted_metadata_file_is_refused_without_running_it(tmp_path: Path, monkeypatch) -> None:
    saved = _save(tmp_path / "ck")
    meta_file = tmp_path / "ck" / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())
    meta.planner_data = _Evil()
    meta_file.write_bytes(pickle.dumps(meta))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointException):  # DCP wraps the reader's refusal
        _load(tmp_path / "ck", saved)
    assert not (tmp_path / "PWNED").exists()
    with meta_file.open("rb") as f, pytest.raises(UnsafeGlobalError, match=r"the file names '(posix|os)\.system'"):
        load_dcp_metadata(f, str(meta_file))


def test_a_crafted_byte_item_is_refused_without_running_it(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"extra": {"step": 1, "evil": _Evil()}}, checkpoint_id=str(path), no_dist=True)
    monkeypatch.chdir(tmp_path)
    target = {"extra": {"step": 0, "evil": None}}
    with warnings.catch_warnings(), pytest.raises(CheckpointException):  # DCP wraps the refusal
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=SafeFileSystemReader(str(path)), planner=SafeDcpLoadPlanner(), no_dist=True)
    assert not (tmp_path / "PWNED").exists()
    planner = SafeDcpLoadPlanner()  # the refusal itself names the item
    item = type("Item", (), {"dest_index": type("Index", (), {"fqn": "extra.evil"})()})()
    raw = path / "__0_0.distcp"
    import io
    buf = io.BytesIO()
    torch.save(_Evil(), buf)
    buf.seek(0)
    with pytest.raises(UnsafeGlobalError, match=r"'extra\.evil'.*GLOBAL (posix|os)\.system"):
        planner.load_bytes(item, buf)  # type: ignore[arg-type]
    assert raw.exists() and not (tmp_path / "PWNED").exists()


def test_not_a_metadata_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / ".metadata"
    bad.write_bytes(b"not a pickle at all")
    with bad.open("rb") as f, pytest.raises(pickle.UnpicklingError, match="not a DCP metadata file"):
        load_dcp_metadata(f, str(bad))


def _strategy(seed: int):
    from encdec.distributed import make_strategy
    from encdec.train.optim import build_optimizer

    torch.manual_seed(seed)
    s = make_strategy("none", optimizer_factory=build_optimizer)
    s.setup(torch.nn.Linear(3, 2), {"name": "adamw", "lr": 1e-3}, precision="fp32", grad_accum=1,
            activation_checkpointing=False)
    return s


def test_strategy_load_reads_metadata_once(tmp_path: Path, monkeypatch) -> None:
    from encdec.distributed import dcp_safe

    old = _strategy(0)
    old.save(tmp_path / "step_1", {"step": 1})
    calls = []
    real = dcp_safe._MetadataUnpickler.load

    def counted(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(dcp_safe._MetadataUnpickler, "load", counted)
    new = _strategy(1)
    assert new.load(tmp_path / "step_1")["step"] == 1
    assert len(calls) == 1  # the pre-read; the reader is handed its result
    assert torch.equal(new.module.weight, old.module.weight)


def test_strategy_load_refuses_a_crafted_byte_item_as_refused(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from torch.distributed.checkpoint.state_dict import get_state_dict

    from encdec.distributed.ckpt_io import CheckpointError

    old = _strategy(0)
    old.save(tmp_path / "step_1", {"step": 1})
    model_sd, optim_sd = get_state_dict(old.module, old.optimizer)
    optim_sd["param_groups"][0]["lr"] = _Evil()  # a byte item; .metadata itself stays plain data
    state_dir = tmp_path / "step_1" / "state"
    shutil.rmtree(state_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(state_dir), no_dist=True)
    with (state_dir / ".metadata").open("rb") as f:
        load_dcp_metadata(f)  # the metadata passes: the refusal comes from the byte item
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"was refused: .*(posix|os)\.system") as info:
        _strategy(1).load(tmp_path / "step_1")
    assert "does not fit" not in str(info.value)
    assert not (tmp_path / "PWNED").exists()
