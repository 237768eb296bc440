"""TerraTorch checkpoints (``--init-from``): read a Lightning-shaped file, map TerraTorch's key names, load strictly.

The key names and shapes come from the real TerraTorch 1.2.11 (``fixtures/terratorch_keys_*.json``, written by
``fixtures/make_terratorch_keys.py``); the checkpoints are fabricated from them with random tensors, in the
layout Lightning writes (``state_dict`` with the task's ``model.`` prefix, the loss's ``criterion.*`` tensors,
pickled hyper-parameter objects of classes that are not installed here).
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from encdec import build_model
from encdec.models.terratorch_ckpt import (
    CheckpointMismatch,
    CheckpointReadError,
    load_terratorch_weights,
    map_terratorch_keys,
    read_checkpoint,
)

FIXTURES = Path(__file__).parent / "fixtures"
CASES = sorted(p.stem.removeprefix("terratorch_keys_") for p in FIXTURES.glob("terratorch_keys_*.json"))


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"terratorch_keys_{name}.json").read_text())


def _fake_state_dict(keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=gen)
        for k, shape in keys.items()
    }


def _save_lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """A Lightning-like checkpoint whose hyper-parameters are an object of a module the reader cannot import."""
    mod = types.ModuleType("terratorch_fake_tasks")

    class SemanticSegmentationTaskHparams:  # stands for Lightning's AttributeDict / TerraTorch objects
        def __init__(self) -> None:
            self.model_factory = "EncoderDecoderFactory"

    SemanticSegmentationTaskHparams.__module__ = mod.__name__
    SemanticSegmentationTaskHparams.__qualname__ = "SemanticSegmentationTaskHparams"
    mod.SemanticSegmentationTaskHparams = SemanticSegmentationTaskHparams  # type: ignore[attr-defined]
    sd = {f"model.{k}": v for k, v in state_dict.items()}
    sd["criterion.weight"] = torch.ones(2)  # the task's loss module lives beside the model
    ckpt = {"epoch": 3, "global_step": 120, "state_dict": sd, "hyper_parameters": SemanticSegmentationTaskHparams()}
    sys.modules[mod.__name__] = mod
    try:
        torch.save(ckpt, path)
    finally:
        del sys.modules[mod.__name__]


@pytest.mark.parametrize("case", CASES)
def test_terratorch_checkpoint_loads_strictly(case: str, tmp_path: Path) -> None:
    fx = _fixture(case)
    model = build_model(fx["task"], **copy.deepcopy(fx["model_args"]))
    tt_sd = _fake_state_dict(fx["keys"])
    _save_lightning_ckpt(tmp_path / "tt.ckpt", tt_sd)

    read = read_checkpoint(tmp_path / "tt.ckpt")
    assert set(read) == set(tt_sd)  # model. stripped, criterion.* dropped
    load_terratorch_weights(model, read, strict=True)

    mapped, unexpected, skipped = map_terratorch_keys(tt_sd, model)
    assert not unexpected
    assert all(k.endswith("pos_embed") for k in skipped)  # Prithvi's fixed sin-cos table is recomputed here
    ours = model.state_dict()
    assert set(mapped) == {k for k in ours if not k.endswith("pos_embed")}
    for key, value in mapped.items():
        torch.testing.assert_close(ours[key], value.to(ours[key].dtype), msg=key)
    # the renamed head really received TerraTorch's final conv
    torch.testing.assert_close(model.head.final.weight, tt_sd["head.head.2.weight"])


def test_lora_keys_map_through_terratorchs_peft_model_wrapper() -> None:
    fx = _fixture("prithvi_upernet_lora")
    model = build_model(fx["task"], **copy.deepcopy(fx["model_args"]))
    mapped, _, _ = map_terratorch_keys(_fake_state_dict(fx["keys"]), model)
    assert "encoder.blocks.0.attn.qkv.q_linear.lora_A.default.weight" in mapped
    assert "encoder.blocks.0.attn.qkv.k_linear.weight" in mapped
    assert "neck.2.fpn1.0.bias" in mapped


def test_mismatched_checkpoint_names_the_problems(tmp_path: Path) -> None:
    fx = _fixture("prithvi_upernet")
    args = copy.deepcopy(fx["model_args"])
    args["num_classes"] = 5  # the TerraTorch run had 3
    model = build_model(fx["task"], **args)
    sd = _fake_state_dict(fx["keys"])
    del sd["decoder.fpn_bottleneck.conv.weight"]
    sd["decoder.extra_conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as info:
        load_terratorch_weights(model, sd)
    msg = str(info.value)
    assert "missing in the checkpoint (1): ['decoder.fpn_bottleneck.conv.weight']" in msg
    assert "unexpected in the checkpoint (1): ['decoder.extra_conv.weight']" in msg
    assert "head.final.weight: checkpoint (3, 64, 1, 1) vs model (5, 64, 1, 1)" in msg
    assert "same model_args" in msg and isinstance(info.value, ValueError)

    before = model.head.final.weight.detach().clone()
    load_terratorch_weights(model, sd, strict=False)  # takes what fits, leaves the rest
    torch.testing.assert_close(model.head.final.weight, before)
    torch.testing.assert_close(model.decoder.bottleneck.conv.weight, sd["decoder.bottleneck.conv.weight"])


def test_unreadable_checkpoints_raise_a_typed_error_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointReadError, match=r"does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointReadError, match=r"cannot read checkpoint .*garbage\.ckpt"):
        read_checkpoint(garbage)
    empty = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"criterion.weight": 1.0}}, empty)
    with pytest.raises(CheckpointReadError, match=r"no model weights"):
        read_checkpoint(empty)
    plain = tmp_path / "plain.pt"
    torch.save({"head.head.2.bias": torch.zeros(2)}, plain)
    assert set(read_checkpoint(plain)) == {"head.head.2.bias"}


def test_meta_model_and_meta_state_dict_check_names_and_shapes_only() -> None:
    # the launcher's early --init-from check: nothing allocated, mismatches still found
    fx = _fixture("prithvi_upernet_lora")
    with torch.device("meta"):
        model = build_model(fx["task"], **copy.deepcopy(fx["model_args"]))
    sd = {k: torch.empty(shape, device="meta") for k, shape in fx["keys"].items()}
    load_terratorch_weights(model, sd)
    sd["head.head.2.weight"] = torch.empty(3, 256, 1, 1, device="meta")
    with pytest.raises(CheckpointMismatch, match=r"head\.final\.weight: checkpoint \(3, 256, 1, 1\) vs model \(2, 256"):
        load_terratorch_weights(model, sd)
