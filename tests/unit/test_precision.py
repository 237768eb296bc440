"""Precision: resolving ``auto`` from CPU flags, fp16 only on GPU, frozen weights stored in bf16 once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from encdec.train import precision as P


def _cpuinfo(tmp_path: Path, flags: str) -> str:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
    return str(path)


def test_cpu_bf16_flags(tmp_path: Path) -> None:
    assert P.cpu_has_bf16(_cpuinfo(tmp_path / "a", "avx512f avx512_bf16"))
    assert P.cpu_has_bf16(_cpuinfo(tmp_path / "c", "amx_bf16 amx_tile"))
    assert not P.cpu_has_bf16(_cpuinfo(tmp_path / "b", "avx2 avx512f"))
    assert not P.cpu_has_bf16(str(tmp_path / "missing"))


def test_resolve() -> None:
    cpu = torch.device("cpu")
    assert P.resolve_precision("fp32", cpu) == "fp32"
    assert P.resolve_precision("bf16", cpu) == "bf16"
    assert P.resolve_precision("auto", cpu) == ("bf16" if P.cpu_has_bf16() else "fp32")
    with pytest.raises(P.PrecisionError, match="'fp16' needs a GPU"):
        P.resolve_precision("fp16", cpu)
    with pytest.raises(P.PrecisionError, match="'half' is not supported"):
        P.resolve_precision("half", cpu)
    assert P.make_grad_scaler("bf16", cpu) is None


def test_cast_frozen_weights_keeps_trainable_fp32_and_output_close() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    x = torch.randn(3, 8)
    with P.autocast("bf16", torch.device("cpu")):
        ref = model(x).float()
    moved = P.cast_frozen_weights(model, torch.bfloat16)
    assert moved == 8 * 16 + 16
    assert model[0].weight.dtype == torch.bfloat16
    assert model[1].weight.dtype == torch.float32  # norms stay fp32
    assert model[2].weight.dtype == torch.float32  # trainable: fp32 master weights
    with P.autocast("bf16", torch.device("cpu")):
        out = model(x).float()
    torch.testing.assert_close(out, ref)  # autocast computed with the same bf16 values before
    out.sum().backward()
    assert model[2].weight.grad is not None and model[2].weight.grad.dtype == torch.float32


def test_store_for_autocast_on_a_lora_model_keeps_the_bf16_result() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, 8)
    with P.autocast("bf16", torch.device("cpu")):
        ref = model(x).float()
    assert P.store_for_autocast(model, "fp32") == {"frozen_cast": 0, "adapters": 0}
    done = P.store_for_autocast(model, "bf16")
    assert done["adapters"] == 1 and done["frozen_cast"] == 8 * 8 + 8 + 8 * 2 + 2
    lora_a = model.base_model.model[0].lora_A["default"].weight
    assert lora_a.dtype == torch.float32 and lora_a.requires_grad
    with P.autocast("bf16", torch.device("cpu")):
        out = model(x).float()
    torch.testing.assert_close(out, ref)


def test_fp32_means_fp32_matmuls() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # what importing TerraTorch does
        assert P.pin_fp32_matmuls("fp32") == "medium"
        assert torch.get_float32_matmul_precision() == "highest"
        assert P.pin_fp32_matmuls("fp32") is None
        torch.set_float32_matmul_precision("medium")
        assert P.pin_fp32_matmuls("bf16") is None and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
