"""Reading files someone else wrote runs none of their code (``encdec.models.safe_load``).

Each crafted file would run a command under a plain ``torch.load(weights_only=False)`` (checked first, so the
test cannot pass on a harmless file); through our readers the marker file is never created and the tensors
still load.
"""

from __future__ import annotations

import builtins
import enum
import functools
import json
import os
import pathlib
import pickle
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from encdec.models.safe_load import Stub, UnsafeGlobalError, safe_torch_load
from encdec.models.terratorch_ckpt import CheckpointReadError, read_checkpoint
from encdec.train.checkpoint import META_FILE, load_extra, save_extra
from encdec.train.loop_parts import capture_rng


class _Call:
    """Pickles as ``func(*args)``: what a malicious checkpoint does with ``__reduce__``."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def _attacks(marker: Path) -> dict[str, _Call]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Call(os.system, f"touch {marker}"),
        "subprocess.Popen": _Call(subprocess.Popen, ["touch", str(marker)]),
        "subprocess.check_call": _Call(subprocess.check_call, ["touch", str(marker)]),
        "builtins.exec": _Call(builtins.exec, touch),
        "builtins.eval": _Call(builtins.eval, touch),
        # a call on the result of a call: partial(os.system, cmd) is built, then called
        "functools.partial": _Call(functools.partial(os.system, f"touch {marker}")),
    }


ATTACKS = list(_attacks(Path("x")))


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "PWNED"
    yield path
    path.unlink(missing_ok=True)


def _save(obj: Any, path: Path, **kw: Any) -> Path:
    torch.save(obj, path, **kw)
    return path


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("fmt", ["zip", "legacy", "protocol4"])
def test_crafted_checkpoint_runs_nothing_and_its_weights_load(name: str, fmt: str, tmp_path: Path,
                                                              marker: Path) -> None:
    weights = {"model.head.head.2.weight": torch.randn(2, 4, 1, 1), "model.head.head.2.bias": torch.zeros(2)}
    formats: dict[str, dict[str, Any]] = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False},
                                          "protocol4": {"pickle_protocol": 4}}
    kw = formats[fmt]
    path = _save({"state_dict": weights, "hyper_parameters": _attacks(marker)[name], "epoch": 1},
                 tmp_path / "evil.ckpt", **kw)

    # the file really is an attack: a plain full unpickle runs it
    ran = torch.load(path, weights_only=False)["hyper_parameters"]
    if isinstance(ran, subprocess.Popen):
        ran.wait()
    assert marker.exists()
    marker.unlink()

    stubbed: list[str] = []
    ckpt = safe_torch_load(path, stubbed=stubbed)
    assert not marker.exists()
    assert isinstance(ckpt["hyper_parameters"], Stub)
    assert stubbed and all(not s.startswith(("torch.", "collections.")) for s in stubbed)
    got = read_checkpoint(path)  # --init-from's reader
    assert not marker.exists()
    assert set(got) == {"head.head.2.weight", "head.head.2.bias"}
    torch.testing.assert_close(got["head.head.2.weight"], weights["model.head.head.2.weight"])


def test_a_stand_in_called_by_the_pickle_stays_inert(tmp_path: Path, marker: Path) -> None:
    partial = functools.partial(os.system, f"touch {marker}")
    ckpt = safe_torch_load(_save({"built": partial, "called": _Call(partial)}, tmp_path / "p.pt"))
    assert ckpt["built"].stub_of == "functools.partial" and "posix.system" in repr(ckpt["built"].args)
    assert isinstance(ckpt["called"], Stub) and ckpt["called"].args == ()
    assert not marker.exists()


def test_setting_state_on_an_allowlisted_object_is_refused_with_the_reason(tmp_path: Path) -> None:
    class Rewire:  # would set attributes on torch.device (or on one of torch's rebuild functions)
        def __reduce__(self) -> tuple[Any, ...]:
            return torch.device, ("cpu",), {"type": "evil"}

    path = _save({"state_dict": {"w": torch.ones(1)}, "x": Rewire()}, tmp_path / "rewire.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"sets the state of a device object, which is not allowed"):
        safe_torch_load(path)
    with pytest.raises(CheckpointReadError, match=r"cannot read checkpoint .*rewire\.pt.*not allowed"):
        read_checkpoint(path)


def _fake_lightning_module() -> types.ModuleType:
    """Classes as Lightning/TerraTorch pickle them, in a module the reader cannot import."""
    mod = types.ModuleType("lightning_fake_utilities")

    class AttributeDict(dict):  # type: ignore[type-arg]  # Lightning's hparams container
        pass

    class TrainerFn(enum.Enum):
        FITTING = "fit"

    class Hparams:
        def __init__(self) -> None:
            self.model_factory = "EncoderDecoderFactory"
            self.model_args = {"backbone": "prithvi_eo_tiny", "num_classes": 2}

    for cls in (AttributeDict, TrainerFn, Hparams):
        cls.__module__ = mod.__name__
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
    return mod


def test_lightning_checkpoint_with_unknown_classes_loads_its_state_dict(tmp_path: Path) -> None:
    mod = _fake_lightning_module()
    weights = {"model.decoder.conv.weight": torch.randn(3, 3), "model.decoder.conv.bias": torch.randn(3)}
    ckpt = {
        "epoch": 4, "global_step": 10, "pytorch-lightning_version": "2.6.6", "state_dict": weights,
        "hyper_parameters": mod.AttributeDict(model_args={"decoder": "FCNDecoder"}, lr=1e-4),
        "hparams_obj": mod.Hparams(),
        "loops": {"fit_loop": {"state": mod.TrainerFn.FITTING}},
        "callbacks": {"ModelCheckpoint": {"dirpath": pathlib.PurePosixPath("/runs/x"), "best": torch.tensor(0.5)}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]}],
    }
    sys.modules[mod.__name__] = mod
    try:
        path = _save(ckpt, tmp_path / "lightning.ckpt")
    finally:
        del sys.modules[mod.__name__]

    stubbed: list[str] = []
    got = safe_torch_load(path, stubbed=stubbed)
    assert "lightning_fake_utilities.AttributeDict" in stubbed and "pathlib.PurePosixPath" in stubbed
    assert got["hyper_parameters"] == {"model_args": {"decoder": "FCNDecoder"}, "lr": 1e-4}  # a dict stand-in
    assert got["hparams_obj"].model_args == {"backbone": "prithvi_eo_tiny", "num_classes": 2}
    assert got["loops"]["fit_loop"]["state"].args == ("fit",)
    assert got["callbacks"]["ModelCheckpoint"]["best"].item() == 0.5
    tensors = read_checkpoint(path)
    assert set(tensors) == {"decoder.conv.weight", "decoder.conv.bias"}
    torch.testing.assert_close(tensors["decoder.conv.weight"], weights["model.decoder.conv.weight"])


def test_a_file_that_is_only_a_stand_in_says_so(tmp_path: Path, marker: Path) -> None:
    path = _save(_attacks(marker)["os.system"], tmp_path / "only.ckpt")
    with pytest.raises(CheckpointReadError, match=r"no model weights.*'posix.system'.*inert stand-ins"):
        read_checkpoint(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- run checkpoints
def _complete_meta(ckpt_dir: Path) -> None:
    (ckpt_dir / META_FILE).write_text(json.dumps({"complete": True, "world_size": 1, "step": 3}))


def test_run_checkpoint_extra_round_trips_with_rng_states(tmp_path: Path) -> None:
    _complete_meta(tmp_path)
    extra: dict[str, Any] = {"step": 3, "data": {"epoch": 0, "samples_consumed": 12, "seed": 7}, "rng": capture_rng(),
                             "world_size": 1, "np_scalar": np.float64(0.25)}
    save_extra(tmp_path, 0, extra)
    got = load_extra(tmp_path, 0, 1)
    assert got["step"] == 3 and got["data"] == extra["data"] and got["np_scalar"] == 0.25
    np.testing.assert_array_equal(got["rng"]["numpy"][1], extra["rng"]["numpy"][1])
    assert got["rng"]["python"] == extra["rng"]["python"]
    assert torch.equal(got["rng"]["torch"], extra["rng"]["torch"])
    np.random.set_state(got["rng"]["numpy"])  # still usable as RNG states


def test_tampered_run_checkpoint_extra_is_refused_naming_the_global(tmp_path: Path, marker: Path) -> None:
    _complete_meta(tmp_path)
    save_extra(tmp_path, 0, {"step": 3, "data": _attacks(marker)["os.system"]})
    with pytest.raises(UnsafeGlobalError, match=r"rank_00000\.pt: the file names 'posix\.system'"):
        load_extra(tmp_path, 0, 1)
    assert not marker.exists()


def test_deepspeed_param_groups_file_reads_without_pickled_code(tmp_path: Path, marker: Path) -> None:
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.05, "amsgrad": False, "foreach": None},
              {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "amsgrad": False, "foreach": None}]
    assert safe_torch_load(_save(groups, tmp_path / "param_groups.pt"), stub_unknown=False) == groups
    evil = _save([{"lr": _attacks(marker)["builtins.eval"]}], tmp_path / "evil_groups.pt")
    with pytest.raises(UnsafeGlobalError, match=r"'builtins\.eval'"):
        safe_torch_load(evil, stub_unknown=False)
    assert not marker.exists()
