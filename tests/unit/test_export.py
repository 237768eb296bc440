"""Export of a LoRA model: merged plain state dict (strict load, equal outputs), the official Prithvi layout read
by our loader (also into a PEFT model built on meta), and adapter-only checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encdec.models import build_model
from encdec.models.backbones.prithvi import load_pretrained
from encdec.models.export import (
    ExportError,
    load_trainable_state_dict,
    merge_and_export,
    to_official_prithvi,
    trainable_state_dict,
)
from encdec.models.peft import is_adapter_key, reset_adapters

LORA = {
    "method": "LORA",
    "replace_qkv": "qkv",
    "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear", "mlp.fc1"], "r": 4, "lora_alpha": 8},
}


def build(peft_config: dict[str, Any] | None = None, **backbone: Any) -> nn.Module:
    return build_model(
        "segmentation", backbone="prithvi_eo_tiny", backbone_img_size=32, decoder="FCNDecoder", decoder_norm="batch",
        decoder_channels=16, necks=[{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}],
        num_classes=3, peft_config=peft_config, **{f"backbone_{k}": v for k, v in backbone.items()},
    )


def train(model: nn.Module, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 32, 32, generator=gen)
    mask = torch.randint(0, 3, (2, 32, 32), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(steps):
        F.cross_entropy(model(x).output, mask).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout checkpoint of a random prithvi_eo_tiny (decoder keys and mask_token included)."""
    torch.manual_seed(0)
    sd = to_official_prithvi(build().state_dict())
    sd["decoder.decoder_embed.weight"] = torch.zeros(4, 4)
    sd["mask_token"] = torch.zeros(1, 1, 256)
    path = tmp_path_factory.mktemp("ckpt") / "prithvi_tiny.pt"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def trained(base_ckpt: Path) -> nn.Module:
    torch.manual_seed(1)
    model = build(LORA, pretrained=True, ckpt_path=str(base_ckpt))
    train(model)
    return model


X = torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(9))


def test_merge_and_export_loads_strictly_with_equal_outputs(trained: nn.Module) -> None:
    exported = merge_and_export(trained)
    fresh = build().eval()
    assert list(exported) == list(fresh.state_dict())  # same keys, same order as a model built without PEFT
    fresh.load_state_dict(exported, strict=True)
    with torch.no_grad():
        want = trained(X).output
        got = fresh(X).output
    assert (got - want).abs().max().item() <= 1e-5
    assert any(is_adapter_key(k) for k in trained.state_dict())  # the trained model keeps its adapters


def test_official_layout_reloads_through_the_prithvi_loader(trained: nn.Module, tmp_path: Path) -> None:
    official = to_official_prithvi(merge_and_export(trained))
    assert "encoder.blocks.0.attn.qkv.weight" in official and official["encoder.blocks.0.attn.qkv.weight"].shape == (768, 256)
    assert all(k.startswith("encoder.") for k in official)
    assert official["encoder.pos_embed"].shape == (1, 1 + 14 * 14, 256)  # as the official files hold it
    path = tmp_path / "merged.pt"
    torch.save(official, path)
    with torch.no_grad():
        want = trained.encoder(X)[-1]
    plain = build(pretrained=True, ckpt_path=str(path)).eval()
    # build -> PEFT -> load: on meta, materialise, load the fused official weights into the split adapted layers
    with torch.device("meta"):
        adapted = build(LORA, pretrained=True, ckpt_path=str(path))
    adapted.to_empty(device="cpu")
    assert load_pretrained(adapted)
    reset_adapters(adapted)
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.encoder(X)[-1], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapted.encoder(X)[-1], want, atol=1e-5, rtol=0)


def test_official_layout_refuses_unmerged_state(trained: nn.Module) -> None:
    with pytest.raises(ExportError, match="merge_and_export"):
        to_official_prithvi(trained.state_dict())
    with pytest.raises(ExportError, match=r"no 'encoder\.' entries"):
        to_official_prithvi(trained.encoder.state_dict())


def test_trainable_state_dict_round_trip(trained: nn.Module, base_ckpt: Path) -> None:
    small = trainable_state_dict(trained)
    encoder_keys = [k for k in small if k.startswith("encoder.")]
    assert encoder_keys and all(is_adapter_key(k) for k in encoder_keys)
    assert any(k.endswith("running_mean") for k in small)  # decoder BatchNorm statistics travel too
    assert {k.split(".")[0] for k in small} == {"encoder", "decoder", "head"}
    n_small = sum(v.numel() for v in small.values())
    assert n_small < 0.05 * sum(v.numel() for v in trained.state_dict().values())

    torch.manual_seed(123)  # different adapter/decoder init than the trained model
    other = build(LORA, pretrained=True, ckpt_path=str(base_ckpt)).eval()
    with torch.no_grad():
        before = other(X).output
        want = trained(X).output
    assert (before - want).abs().max() > 1e-3
    loaded = load_trainable_state_dict(other, small)
    assert sorted(loaded) == sorted(small)
    with torch.no_grad():
        torch.testing.assert_close(other(X).output, want, atol=0, rtol=0)


def test_terratorch_peft_keys_load(trained: nn.Module, base_ckpt: Path) -> None:
    small = trainable_state_dict(trained)
    tt = {("encoder.base_model.model." + k[len("encoder.") :] if k.startswith("encoder.") else k): v for k, v in small.items()}
    other = build(LORA, pretrained=True, ckpt_path=str(base_ckpt)).eval()
    load_trainable_state_dict(other, tt)
    with torch.no_grad():
        torch.testing.assert_close(other(X).output, trained(X).output, atol=0, rtol=0)


def test_trainable_state_dict_mismatch_is_an_error(trained: nn.Module) -> None:
    small = trainable_state_dict(trained)
    missing = dict(small)
    missing.pop("head.final.weight")
    with pytest.raises(ExportError, match=r"missing keys \['head.final.weight'\]"):
        load_trainable_state_dict(build(LORA), missing)
    with pytest.raises(ExportError, match=r"unexpected keys \['encoder.blocks.0.attn.qkv.q_linear.lora_A"):
        load_trainable_state_dict(build(None), small)
