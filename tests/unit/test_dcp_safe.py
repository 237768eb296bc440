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
