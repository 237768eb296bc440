"""Every supported peft method on prithvi_eo_tiny: trains (loss down, adapters only), merges and exports to a
plain model with equal outputs, builds on meta and re-initialises after ``to_empty``, pickles."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encdec.models import build_model
from encdec.models.backbones import prithvi_load
from encdec.models.export import merge_and_export
from encdec.models.peft import (
    ADAPTER_KEY_MARKERS,
    METHODS,
    PeftConfigError,
    adapter_parameter_names,
    adapter_state_keys,
    check_trainable,
    is_adapter_key,
    reset_adapters,
)

QV = ["qkv.q_linear", "qkv.v_linear"]
CONFIGS: dict[str, dict[str, Any]] = {
    "LORA": {"method": "LORA", "peft_config_kwargs": {"target_modules": QV, "r": 4, "lora_alpha": 8}},
    "DORA": {"method": "LORA", "peft_config_kwargs": {"target_modules": QV, "r": 4, "use_dora": True}},
    "LOHA": {"method": "LOHA", "peft_config_kwargs": {"target_modules": QV, "r": 4, "alpha": 4}},
    "LOKR": {"method": "LOKR", "peft_config_kwargs": {"target_modules": QV, "r": 4}},
    # no feedforward_modules: fc2 (a target named fc2) becomes one, its input is scaled
    "IA3": {"method": "IA3", "peft_config_kwargs": {"target_modules": ["qkv.k_linear", "qkv.v_linear", "mlp.fc2"]}},
    "OFT": {"method": "OFT", "peft_config_kwargs": {"target_modules": QV, "r": 0, "oft_block_size": 16}},
}


def build(peft_config: dict[str, Any] | None = None) -> nn.Module:
    if peft_config is not None:
        peft_config = {"replace_qkv": "qkv", **peft_config}
    return build_model(
        "segmentation",
        backbone="prithvi_eo_tiny",
        backbone_img_size=32,
        decoder="FCNDecoder",
        decoder_channels=16,
        necks=[{"name": "SelectIndices", "indices": [-1]}, {"name": "ReshapeTokensToImage"}],
        num_classes=3,
        peft_config=peft_config,
    )


@pytest.fixture(scope="module")
def plain() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A plain model's state dict, an input batch, its mask, and the plain model's output on it."""
    torch.manual_seed(0)
    model = build().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 32, 32, generator=gen)
    mask = torch.randint(0, 3, (2, 32, 32), generator=gen)
    with torch.no_grad():
        out = model(x).output
    return {k: v.clone() for k, v in model.state_dict().items()}, x, mask, out


def _adapted(name: str, plain_sd: dict[str, torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    model = build(CONFIGS[name])
    result = model.load_state_dict(plain_sd, strict=False)  # fused qkv into the split, adapted layers
    assert not result.unexpected_keys
    assert result.missing_keys and all(is_adapter_key(k) for k in result.missing_keys)
    return model.eval()


def test_every_supported_method_is_tested() -> None:
    assert {c["method"] for c in CONFIGS.values()} == set(METHODS)
    assert prithvi_load.ADAPTER_MARKERS == ADAPTER_KEY_MARKERS  # the loader and PEFT agree on adapter keys


@pytest.mark.parametrize("name", list(CONFIGS))
def test_method_trains_and_exports(name: str, plain: tuple) -> None:
    plain_sd, x, _, plain_out = plain
    model = _adapted(name, plain_sd)
    check_trainable(model)
    adapters = adapter_parameter_names(model.encoder)
    assert adapters and all(is_adapter_key(k) for k in adapter_state_keys(model.encoder))
    for n, p in model.encoder.named_parameters():
        assert p.requires_grad == (n in adapters), n
    with torch.no_grad():  # adapters start neutral
        torch.testing.assert_close(model(x).output, plain_out, atol=1e-5, rtol=0)
        plain_feat = model.encoder(x)[-1]

    # train the adapters alone on the backbone's features: a falling loss is their doing
    target = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.encoder.parameters(), lr=3e-2, weight_decay=0.0)  # frozen base: no grads
    losses = []
    for _ in range(4):
        loss = F.mse_loss(model.encoder(x)[-1], target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-4, losses

    with torch.no_grad():
        adapted_out = model(x).output
        adapted_feat = model.encoder(x)[-1]
    assert (adapted_feat - plain_feat).abs().max() > 1e-3  # the adapters changed the function
    exported = merge_and_export(model)
    fresh = build().eval()
    fresh.load_state_dict(exported, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).output, adapted_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(fresh.encoder(x)[-1], adapted_feat, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x).output, adapted_out, atol=0, rtol=0)  # export left the model as is


@pytest.mark.parametrize("name", list(CONFIGS))
def test_method_on_meta_then_loaded_and_reset(name: str, plain: tuple) -> None:
    plain_sd, x, _, plain_out = plain
    with torch.device("meta"):
        model = build(CONFIGS[name])
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    result = model.load_state_dict(plain_sd, strict=False)
    assert all(is_adapter_key(k) for k in result.missing_keys) and not result.unexpected_keys
    assert reset_adapters(model) > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).output, plain_out, atol=1e-5, rtol=0)
    clone = pickle.loads(pickle.dumps(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(x).output, plain_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(twin(x).output, plain_out, atol=1e-5, rtol=0)
    for copied in (clone, twin):  # the key-mapping load hooks survive pickling and copying
        assert not copied.load_state_dict(plain_sd, strict=False).unexpected_keys


@pytest.mark.parametrize(
    ("method", "pattern"),
    [
        ("VERA", r"'VERA' is not supported \(keeps its shared.*supported methods: LORA, LOHA, LOKR, IA3, OFT"),
        ("BOFT", r"'BOFT' is not supported \(cannot be built on the meta device"),
        ("NOPE", r"'NOPE' is not supported; supported methods: LORA, LOHA"),
    ],
)
def test_unsupported_methods_are_refused(method: str, pattern: str) -> None:
    with pytest.raises(PeftConfigError, match=pattern):
        build({"method": method, "peft_config_kwargs": {"target_modules": QV}})
