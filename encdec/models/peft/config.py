"""``peft_config`` (TerraTorch's dict): the supported methods, its validation, and the peft library config it
becomes (``_build_peft_config``: target checks, IA3 feed-forward rules, LoRA inits that survive ``to_empty``)."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import nn

LOG = logging.getLogger("encdec.peft")

__all__ = ["ADAPTER_KEY_MARKERS", "METHODS", "UNSUPPORTED", "ParsedPeftConfig", "PeftConfigError",
           "TrainableSetError", "build_peft_config", "parse_peft_config"]

#: Substrings marking adapter entries of a state dict (the Prithvi loader tells adapter keys, which a pretrained
#: checkpoint lacks, from base keys, which it must hold, with the same list).
ADAPTER_KEY_MARKERS = ("lora_", "hada_", "lokr_", "ia3_", "oft_", "boft_", "vera_", "lora_magnitude_vector")

#: Methods that apply to ``nn.Linear`` and build, train, merge, export and re-initialise here (each is tested).
METHODS: dict[str, str] = {
    "LORA": "low-rank update B@A; `use_dora: true` gives DoRA",
    "LOHA": "Hadamard product of two low-rank updates",
    "LOKR": "Kronecker-product update",
    "IA3": "learned scaling vectors; `feedforward_modules` have their input scaled, the others their output",
    "OFT": "orthogonal block rotation of the weight; give `r: 0` with `oft_block_size`",
}

#: peft methods that exist but are refused, with the reason.
UNSUPPORTED: dict[str, str] = {
    "VERA": "keeps its shared random projections on the PeftModel wrapper, which peft cannot inject in place",
    "BOFT": "cannot be built on the meta device (it calls .item() at construction) and compiles a CUDA extension",
    "ADALORA": "needs the training loop to call update_and_allocate() at every step to prune ranks",
}

#: LoRA initialisations reproducible after ``to_empty``; the others derive the adapter from the base weights at
#: build time, which on the meta path is before the pretrained weights exist.
_LORA_INITS = (True, False, "gaussian")
_FIELD = "peft_config.peft_config_kwargs"


class PeftConfigError(ValueError):
    """``peft_config`` does not describe a PEFT set-up that can be applied to this backbone."""


class TrainableSetError(RuntimeError):
    """The set of trainable parameters is wrong (e.g. adapters frozen: the TerraTorch freeze trap)."""


class ParsedPeftConfig(NamedTuple):
    """``peft_config`` after validation of its top level."""

    method: str
    replace_qkv: str | None
    peft_config_kwargs: dict[str, Any]


def parse_peft_config(peft_config: Mapping[str, Any]) -> ParsedPeftConfig:
    """Validate the top level of ``peft_config`` (keys, method name, types).

    Raises:
        PeftConfigError: not a mapping, unknown keys, a missing or unsupported method, wrong types.
    """
    if not isinstance(peft_config, Mapping):
        raise PeftConfigError(
            "peft_config must be a mapping like {method: LORA, replace_qkv: qkv, peft_config_kwargs: {...}}, "
            f"got {type(peft_config).__name__}"
        )
    allowed = {"method", "replace_qkv", "peft_config_kwargs"}
    extra = sorted(set(peft_config) - allowed)
    if extra:
        raise PeftConfigError(
            f"peft_config has unknown keys {extra}; allowed keys are {sorted(allowed)} (peft's own options such as "
            "r or target_modules go inside peft_config_kwargs)"
        )
    raw = peft_config.get("method")
    if not isinstance(raw, str):
        raise PeftConfigError(f"peft_config.method must be a string, one of {list(METHODS)}; got {raw!r}")
    method = raw.upper()
    if method not in METHODS:
        why = f" ({UNSUPPORTED[method]})" if method in UNSUPPORTED else ""
        raise PeftConfigError(f"peft_config.method {raw!r} is not supported{why}; supported methods: {', '.join(METHODS)}")
    qkv = peft_config.get("replace_qkv")
    if qkv is not None and (not isinstance(qkv, str) or not qkv):
        raise PeftConfigError(
            f"peft_config.replace_qkv must be a non-empty substring of the fused qkv module names (e.g. 'qkv') or "
            f"null, got {qkv!r}"
        )
    kwargs = peft_config.get("peft_config_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise PeftConfigError(f"{_FIELD} must be a mapping, got {type(kwargs).__name__}")
    return ParsedPeftConfig(method, qkv, dict(kwargs))



def _linear_suffixes(module: nn.Module) -> list[str]:
    """Short, de-duplicated names of the Linear modules (``blocks.3.attn.qkv.q_linear`` -> ``qkv.q_linear``)."""
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]
    return list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in names))


def _check_targets(encoder: nn.Module, targets: str | list[str]) -> None:
    names = [n for n, _ in encoder.named_modules() if n]
    where = f"of {type(encoder).__name__}; Linear modules there: {_linear_suffixes(encoder)}"
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise PeftConfigError(f"{_FIELD}.target_modules regex {targets!r} matches no module {where}")
        return
    # peft's rule for a list: a target matches a module's whole name or a suffix of it that starts at a dot
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise PeftConfigError(
            f"{_FIELD}.target_modules {missing} match no module {where}. After replace_qkv the fused qkv is split "
            "into qkv.q_linear, qkv.k_linear, qkv.v_linear"
        )


def _ia3_feedforward(kwargs: dict[str, Any], targets: str | list[str]) -> None:
    ff = kwargs.get("feedforward_modules")
    if ff is None:
        if isinstance(targets, str):
            raise PeftConfigError(
                f"{_FIELD}.feedforward_modules is required for IA3 when target_modules is a regex: name the targets "
                "whose input (not output) is scaled, e.g. ['mlp.fc2'], or [] for none"
            )
        # IA3 scales the FFN's hidden activation, i.e. the input of its second Linear (fc2 in timm and Prithvi)
        kwargs["feedforward_modules"] = [t for t in targets if t.split(".")[-1] == "fc2"]
        LOG.info("IA3: feedforward_modules not given; using %s (targets named fc2)", kwargs["feedforward_modules"])
    elif not isinstance(ff, str):
        kwargs["feedforward_modules"] = list(ff)
        bad = [f for f in ff if f not in targets] if not isinstance(targets, str) else []
        if bad:
            raise PeftConfigError(
                f"{_FIELD}.feedforward_modules {bad} are not in target_modules {targets}; feedforward modules must be "
                "targets too"
            )


def build_peft_config(method: str, kwargs: dict[str, Any], encoder: nn.Module) -> Any:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    kwargs = dict(kwargs)
    if kwargs.pop("modules_to_save", None):
        raise PeftConfigError(
            f"{_FIELD}.modules_to_save is not supported: neck, decoder and head already train fully, and peft's "
            "wrapper for it would change the backbone's keys; remove it"
        )
    targets = kwargs.get("target_modules")
    if targets is None:
        raise PeftConfigError(
            f"{_FIELD}.target_modules is required for {method}: name the Linear layers to adapt, e.g. "
            f"['qkv.q_linear', 'qkv.v_linear']; Linear modules of {type(encoder).__name__}: {_linear_suffixes(encoder)}"
        )
    if not isinstance(targets, (str, list, tuple, set)) or not targets:
        raise PeftConfigError(f"{_FIELD}.target_modules must be a non-empty list of module names or a regex, got {targets!r}")
    if not isinstance(targets, str):
        targets = kwargs["target_modules"] = list(targets)
    _check_targets(encoder, targets)
    if method == "IA3":
        _ia3_feedforward(kwargs, targets)
    if method == "LORA" and kwargs.get("init_lora_weights", True) not in _LORA_INITS:
        raise PeftConfigError(
            f"{_FIELD}.init_lora_weights={kwargs['init_lora_weights']!r} is not supported: it derives the adapter "
            "from the base weights at build time, before pretrained weights are loaded on the meta path; use one of "
            f"{list(_LORA_INITS)}"
        )
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(method)]
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise PeftConfigError(
            f"{_FIELD} has options {unknown} that {cls.__name__} does not take; its options: "
            f"{sorted(v for v in valid if not v.startswith('_'))}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PeftConfigError(f"{_FIELD} rejected by {cls.__name__}: {e}") from e


