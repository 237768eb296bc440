"""Optimizer over trainable parameters, weight-decay groups, and the warmup + cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from encdec.config import OptimSection
from encdec.train.optim import OptimConfigError, build_optimizer, lr_at, no_decay, param_groups, set_lr


def optim(section: dict) -> OptimSection:
    """The ``optim:`` section as the engine receives it."""
    return OptimSection.model_validate(section)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv2d(4, 2, 1)


def test_groups_hold_trainable_params_only_and_exempt_biases_norms_tokens() -> None:
    model = _Tiny()
    groups = param_groups(model.named_parameters(), weight_decay=0.05)
    decay = {id(p) for p in groups[0]["params"]}
    plain = {id(p) for p in groups[1]["params"]}
    assert decay == {id(model.proj.weight), id(model.conv.weight)}
    assert plain == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias), id(model.conv.bias), id(model.cls_token)}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert no_decay("encoder.pos_embed", torch.zeros(1, 5, 4))


def test_build_adamw_and_sgd() -> None:
    model = _Tiny()
    opt = build_optimizer(model, optim({"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.8, 0.9]}))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert opt.defaults["fused"]  # one kernel per parameter, CPU included
    assert not build_optimizer(model, optim({"fused": False})).defaults["fused"]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_trainable
    sgd = build_optimizer(model, optim({"name": "sgd", "lr": 0.1, "momentum": 0.5}))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5


def test_no_trainable_parameter_is_an_error_that_explains_the_peft_trap() -> None:
    model = _Tiny().requires_grad_(False)
    with pytest.raises(OptimConfigError, match=r"no trainable parameter.*PEFT"):
        build_optimizer(model, optim({"lr": 1e-3}))


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"name": "adam"}, r"name\n\s+Input should be 'adamw' or 'sgd'"),
        ({"schedule": "step"}, r"schedule\n\s+Input should be 'cosine', 'constant' or 'plateau'"),
        ({"lr": -1}, r"lr\n\s+Input should be greater than 0"),
        ({"grad_accum": 0}, r"grad_accum\n\s+Input should be greater than or equal to 1"),
        ({"momentun": 0.9}, r"momentun\n\s+Extra inputs are not permitted"),
    ],
)
def test_bad_config(cfg: dict, match: str) -> None:
    """The section is checked once, by its type; the optimizer builder never sees a bad one."""
    with pytest.raises(ValidationError, match=match):
        optim(cfg)


def test_warmup_then_cosine() -> None:
    cfg = optim({"lr": 1.0, "warmup_steps": 4, "min_lr": 0.1, "schedule": "cosine"})
    lrs = [lr_at(s, cfg, max_steps=14) for s in range(15)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lr_at(100, cfg, max_steps=14) == pytest.approx(0.1)  # past the end stays at the floor
    assert lr_at(7, optim({"lr": 2.0, "schedule": "constant", "warmup_steps": 2}), 10) == 2.0


def test_set_lr_honours_lr_scale() -> None:
    model = _Tiny()
    opt = build_optimizer(model, optim({"lr": 1.0}))
    opt.param_groups[1]["lr_scale"] = 0.1
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])


def test_fused_adamw_matches_the_reference_implementation() -> None:
    models = [_Tiny(), _Tiny()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, optim({"lr": 1e-2, "weight_decay": 0.1, "fused": f})) for m, f in zip(models, (True, False))]
    x = torch.randn(2, 4, 3, 3)
    for _ in range(3):
        for m, opt in zip(models, opts):
            out = m.conv(m.norm(m.proj(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)) + m.cls_token.sum()
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
