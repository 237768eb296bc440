"""PEFT on the backbone after splitting fused qkv: ``get_peft_backbone(peft_config, encoder)``.

``peft_config`` is TerraTorch's dict::

    {"method": "LORA", "replace_qkv": "qkv",
     "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 16, "lora_alpha": 16}}

Every ``Linear(D, 3D)`` whose name contains ``replace_qkv`` becomes a :class:`QKVSep` (``q_linear``, ``k_linear``,
``v_linear``, same output), the ``peft`` library injects the adapters, the base backbone is frozen and only the
adapters train in it. Neck, decoder and head are built after this by the factory and stay fully trainable.

Why ``peft.inject_adapter_in_model`` and not ``get_peft_model`` (TerraTorch's choice): ``get_peft_model`` wraps the
encoder in a ``PeftModel``, which moves every key under ``base_model.model.`` (the official/TerraTorch encoder
layout and our Prithvi loader address ``encoder.blocks.N...``), changes the encoder's type, and reaches
``out_channels``/``blocks``/``patch_size`` only through ``__getattr__`` forwarding; its extras (``save_pretrained``,
task types, generation) serve Hugging Face language models, not a backbone inside our model. Injection mutates
the encoder in place: same class, attributes, forward (``temporal_coords``/``location_coords`` pass straight
through), ``blocks`` for per-block FSDP2 and activation checkpointing, and keys that differ from the plain model
only inside adapted layers (``q_linear.base_layer.weight``, ``q_linear.lora_A.default.weight``). What the wrapper
would give we do per layer with peft's own code: merging (``export.merge_and_export`` calls each layer's
``merge``) and adapter-only checkpoints (``export.trainable_state_dict``, which also reads TerraTorch's
``base_model.model.`` keys). The cost: tuners that keep state on the wrapper (VeRA) cannot be injected; they are
refused with the reason.

Build order on the meta device (the engine's path): build (meta) -> ``to_empty`` -> initialise ->
``load_pretrained`` (fused ``qkv`` keys land in the split, adapted layers: :class:`QKVSep` and a load pre-hook on
each adapted layer map them) -> :func:`reset_adapters` (after ``to_empty`` adapter tensors are garbage; DoRA's
magnitude depends on the loaded base) -> :func:`check_trainable` -> shard -> optimizer.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "ADAPTER_KEY_MARKERS", "METHODS", "PARTS", "PartCount", "PeftConfigError", "QKVSep", "TrainableSetError",
    "adapter_parameter_names", "adapter_state_keys", "check_trainable", "format_parameter_report",
    "freeze_backbone", "get_peft_backbone", "is_adapter_key", "parameter_report", "parse_peft_config",
    "replace_qkv", "reset_adapters", "tuner_layers",
]

LOG = logging.getLogger("encdec.peft")

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


# -- the qkv split ------------------------------------------------------------------------------------------------


def _base_path(module: nn.Module) -> str:
    """Key path from an (optionally peft-wrapped) layer to its plain base layer: ``""``, ``"base_layer."``..."""
    path = ""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        path += "base_layer."
        module = module.base_layer  # type: ignore[assignment]
    return path


_QKV = ("q_linear", "k_linear", "v_linear")


class QKVSep(nn.Module):
    """A fused ``qkv = Linear(D, 3D)`` as three ``Linear(D, D)``: ``q_linear``, ``k_linear``, ``v_linear``.

    The output is ``cat([q(x), k(x), v(x)], -1)``, what the fused layer gives, so attention code calling
    ``self.qkv(x)`` is unchanged. A state dict with the fused ``<prefix>weight`` [3D, D] / ``<prefix>bias`` [3D]
    loads by splitting them onto the three layers, also when peft has wrapped them (targets then are
    ``q_linear.base_layer.weight``...): pretrained Prithvi/timm checkpoints load onto the split, adapted model.

    Args:
        dim: D, the input width (each of q, k, v is D wide).
        bias: whether the layers have a bias.
        device, dtype: as for ``nn.Linear`` (``device="meta"`` builds without memory).
    """

    def __init__(
        self, dim: int, bias: bool = True, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.in_features = dim
        self.out_features = 3 * dim
        self.q_linear = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)
        self.k_linear = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)
        self.v_linear = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, fused: nn.Linear) -> QKVSep:
        """Split ``fused`` into copies (not views of its storage, so the fused tensor can be freed)."""
        dim = fused.in_features
        if fused.out_features != 3 * dim:
            raise ValueError(f"QKVSep needs Linear(D, 3D); got Linear({fused.in_features}, {fused.out_features})")
        sep = cls(dim, bias=fused.bias is not None, device=fused.weight.device, dtype=fused.weight.dtype)
        with torch.no_grad():
            for lin, w in zip(sep.parts(), fused.weight.chunk(3)):
                lin.weight.copy_(w)
            if fused.bias is not None:
                for lin, b in zip(sep.parts(), fused.bias.chunk(3)):
                    lin.bias.copy_(b)
        return sep.train(fused.training)

    def parts(self) -> tuple[Any, Any, Any]:
        """``(q_linear, k_linear, v_linear)`` as they are (peft-wrapped or plain)."""
        return self.q_linear, self.k_linear, self.v_linear

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q_linear(x), self.k_linear(x), self.v_linear(x)], dim=-1)

    def fuse(self) -> nn.Linear:
        """The equivalent fused ``Linear(D, 3D)`` of the base layers (merge adapters first to keep them)."""
        bases = [p.get_base_layer() if hasattr(p, "get_base_layer") else p for p in self.parts()]
        w = bases[0].weight
        out = nn.Linear(self.in_features, self.out_features, bias=bases[0].bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([b.weight for b in bases]))
            if out.bias is not None:
                out.bias.copy_(torch.cat([b.bias for b in bases]))
        return out

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # torch calls this before loading the children, and takes the children's keys from this same dict, so
        # writing the split keys here is all q/k/v (plain or peft-wrapped) need.
        for kind in ("weight", "bias"):
            key = prefix + kind
            if key not in state_dict:
                continue
            fused = state_dict.pop(key)
            if fused.dim() < 1 or fused.shape[0] != self.out_features:
                error_msgs.append(
                    f"size mismatch for {key}: a fused qkv {kind} of shape {tuple(fused.shape)} cannot be split "
                    f"into q/k/v of width {self.in_features} (needs first dimension {self.out_features})"
                )
                continue
            for name, part in zip(_QKV, fused.chunk(3, dim=0)):
                dest = prefix + name + "." + _base_path(getattr(self, name)) + kind
                if dest in state_dict:
                    error_msgs.append(f"both the fused {key} and the split {dest} are given; keep one form")
                    continue
                state_dict[dest] = part
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"dim={self.in_features}"


def replace_qkv(module: nn.Module, substring: str) -> list[str]:
    """Replace every ``Linear(D, 3D)`` whose name contains ``substring`` with a :class:`QKVSep`, in place.

    Modules inside a matched module are not matched again.

    Returns:
        The names of the replaced modules.

    Raises:
        PeftConfigError: a match is not ``Linear(D, 3D)`` (named), or nothing matched (the ``Linear(D, 3D)``
            candidates are listed).
    """
    matched: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if name and substring in name and not any(name.startswith(p + ".") for p, _ in matched):
            matched.append((name, m))
    if not matched:
        fused = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.out_features == 3 * m.in_features]
        hint = (
            f"fused Linear(D, 3D) modules there: {fused[:6]}{' ...' if len(fused) > 6 else ''}; set replace_qkv to a "
            "substring of their names"
            if fused
            else "it has no fused Linear(D, 3D) module; set replace_qkv to null for a backbone with separate q/k/v"
        )
        raise PeftConfigError(f"peft_config.replace_qkv {substring!r} matches no module of {type(module).__name__}: {hint}")
    for name, m in matched:
        if isinstance(m, QKVSep):
            raise PeftConfigError(f"peft_config.replace_qkv: {name} is already split (QKVSep); split a backbone once")
        if not isinstance(m, nn.Linear) or m.out_features != 3 * m.in_features:
            shape = f"Linear({m.in_features}, {m.out_features})" if isinstance(m, nn.Linear) else type(m).__name__
            raise PeftConfigError(
                f"peft_config.replace_qkv {substring!r} matches {name}, a {shape}, but only a fused Linear(D, 3D) can "
                "be split into q/k/v; use a substring that names only the fused qkv layers"
            )
    for name, m in matched:
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, QKVSep.from_linear(m))  # type: ignore[arg-type]
    return [n for n, _ in matched]


# -- building the peft config and injecting -----------------------------------------------------------------------


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


def _build_peft_config(method: str, kwargs: dict[str, Any], encoder: nn.Module) -> Any:
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


def tuner_layers(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(name, layer)`` for every peft tuner layer (an adapted Linear) inside ``module``."""
    # A model can hold peft layers only if peft was imported (to build or unpickle them): do not import it here,
    # which would cost seconds for models without PEFT.
    utils = sys.modules.get("peft.tuners.tuners_utils")
    if utils is None:
        return
    for name, m in module.named_modules():
        if isinstance(m, utils.BaseTunerLayer):
            yield name, m


def _plain_keys_to_base_layer(module: Any, state_dict: dict[str, Any], prefix: str, *rest: Any) -> None:
    """Load pre-hook of an adapted layer: a plain layer's ``<prefix>weight`` goes to ``<prefix>base_layer.weight``.

    Pretrained checkpoints and exports hold plain keys (``mlp.fc2.weight``). A module-level function, so the model
    still pickles.
    """
    base = module.get_base_layer()
    path = _base_path(module)
    for name, _ in [*base.named_parameters(recurse=False), *base.named_buffers(recurse=False)]:
        key, dest = prefix + name, prefix + path + name
        if key in state_dict:
            if dest in state_dict:
                rest[-1].append(f"both the plain key {key} and the adapted layer's key {dest} are given; keep one")
                continue
            state_dict[dest] = state_dict.pop(key)


def get_peft_backbone(peft_config: Mapping[str, Any], encoder: nn.Module) -> nn.Module:
    """Split fused qkv (``replace_qkv``), inject the adapters and freeze the base backbone, in place.

    Args:
        peft_config: ``{"method", "replace_qkv", "peft_config_kwargs"}`` (see the module docstring).
        encoder: the backbone; it keeps its class, attributes (``out_channels``, ``patch_size``, ``blocks``) and
            forward signature.

    Returns:
        The same ``encoder`` object, adapted: only adapter parameters require grad in it.

    Raises:
        PeftConfigError: unknown method, bad options, targets or ``replace_qkv`` that match nothing.
        TrainableSetError: the adapters ended up with no trainable parameter (e.g. ``inference_mode: true``).
    """
    cfg = parse_peft_config(peft_config)
    from peft import inject_adapter_in_model

    if any(True for _ in tuner_layers(encoder)):
        raise PeftConfigError(f"{type(encoder).__name__} already carries peft adapters; apply peft_config to a plain backbone once")
    if cfg.replace_qkv is not None:
        replace_qkv(encoder, cfg.replace_qkv)
    peft_cfg = _build_peft_config(cfg.method, cfg.peft_config_kwargs, encoder)
    try:
        inject_adapter_in_model(peft_cfg, encoder)
    except (TypeError, ValueError) as e:
        raise PeftConfigError(f"peft could not apply {cfg.method} to {type(encoder).__name__}: {e}") from e
    for _, layer in tuner_layers(encoder):
        layer.register_load_state_dict_pre_hook(_plain_keys_to_base_layer)
    report = parameter_report(encoder)
    if report["adapters"].trainable == 0:
        raise TrainableSetError(
            f"{cfg.method} adapters were injected ({report['adapters'].total} parameters) but none is trainable; "
            "remove inference_mode from peft_config_kwargs"
        )
    LOG.info("PEFT %s on %s: adapters %d trainable", cfg.method, type(encoder).__name__, report["adapters"].trainable)
    return encoder


# -- which parameters are adapters, which train ------------------------------------------------------------------


def _adapter_entries(module: nn.Module, state: bool) -> set[str]:
    names: set[str] = set()
    for lname, layer in tuner_layers(module):
        pre = f"{lname}." if lname else ""
        entries = layer.state_dict(keep_vars=True) if state else dict(layer.named_parameters())
        names.update(pre + k for k in entries if not k.startswith("base_layer."))
    return names


def adapter_parameter_names(module: nn.Module) -> set[str]:
    """Names (as in ``module.named_parameters()``) of the adapter parameters: inside a tuner layer, outside its
    base layer. Found structurally, not by matching names."""
    return _adapter_entries(module, state=False)


def adapter_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the adapters (parameters and persistent buffers) inside ``module``."""
    return _adapter_entries(module, state=True)


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key names an adapter entry (it contains one of ``ADAPTER_KEY_MARKERS``)."""
    return any(marker in key for marker in ADAPTER_KEY_MARKERS)


def _encoder_of(model: nn.Module) -> nn.Module:
    enc = getattr(model, "encoder", None)
    return enc if isinstance(enc, nn.Module) else model


def freeze_backbone(model: nn.Module) -> int:
    """Freeze the backbone's base weights and leave its adapters trainable (the safe "freeze encoder").

    TerraTorch's ``freeze_encoder`` after PEFT sets ``requires_grad=False`` on every encoder parameter, adapters
    included, and trains nothing in the backbone. Here adapters are told apart structurally.

    Args:
        model: a factory model (its ``encoder`` is frozen) or an encoder.

    Returns:
        The number of backbone parameters left trainable (the adapters').
    """
    enc = _encoder_of(model)
    adapters = adapter_parameter_names(enc)
    for name, p in enc.named_parameters():
        p.requires_grad_(name in adapters)
    return sum(_numel(p) for n, p in enc.named_parameters() if n in adapters)


def check_trainable(model: nn.Module) -> None:
    """Raise if the trainable set is broken; the engine calls it right before building the optimizer.

    Raises:
        TrainableSetError: the backbone has adapters and all are frozen (the freeze trap: something froze the
            whole encoder after PEFT), or nothing in the model is trainable.
    """
    enc = _encoder_of(model)
    adapters = adapter_parameter_names(enc)
    frozen = [n for n, p in enc.named_parameters() if n in adapters and not p.requires_grad]
    if adapters and len(frozen) == len(adapters):
        raise TrainableSetError(
            f"all {len(adapters)} adapter tensors of the backbone are frozen (e.g. {frozen[0]}), so PEFT trains nothing "
            "in it: something set requires_grad=False on the whole encoder after PEFT was applied. Use "
            "encdec.models.peft.freeze_backbone(model), which freezes only the base weights"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainableSetError(f"{type(model).__name__} has no trainable parameter; nothing would be optimised")


# -- re-initialising adapters after to_empty ----------------------------------------------------------------------


def _layer_adapters(layer: Any) -> list[str]:
    names: dict[str, None] = {}
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = getattr(layer, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            names.update(dict.fromkeys(container.keys()))
    return list(names)


def _reset_lora(layer: Any, name: str, cfg: Any) -> None:
    init = getattr(cfg, "init_lora_weights", True)
    if init is False:  # peft leaves both at nn.Linear's default init
        layer.lora_A[name].reset_parameters()
        layer.lora_B[name].reset_parameters()
    else:
        layer.reset_lora_parameters(name, init)
    if name in getattr(layer, "lora_magnitude_vector", {}):  # DoRA: the norm of the (loaded) adapted weight
        delta = layer.lora_B[name].weight @ layer.lora_A[name].weight
        norm = torch.linalg.norm(layer.get_base_layer().weight + layer.scaling[name] * delta, dim=1)
        layer.lora_magnitude_vector[name].weight.copy_(norm)


def _reset_lycoris(layer: Any, name: str, cfg: Any) -> None:  # LoHa, LoKr
    if getattr(cfg, "init_weights", True) is False:
        layer.reset_adapter_parameters_random(name)
    else:
        layer.reset_adapter_parameters(name)


def _reset_ia3(layer: Any, name: str, cfg: Any) -> None:
    if getattr(cfg, "init_ia3_weights", True):
        layer.reset_ia3_parameters(name)
    else:
        layer.ia3_l[name].normal_()


def _reset_oft(layer: Any, name: str, cfg: Any) -> None:
    rot = layer.oft_R[name]
    rows, cols = torch.triu_indices(rot.block_size, rot.block_size, 1, device=rot.rows.device)
    rot.rows.copy_(rows)
    rot.cols.copy_(cols)
    layer.reset_oft_parameters(name, getattr(cfg, "init_weights", True))


@torch.no_grad()
def reset_adapters(module: nn.Module) -> int:
    """Give every adapter the value peft gives it at injection again, in place.

    Needed on the meta path: after ``to_empty`` adapter tensors hold garbage, and a generic ``reset_parameters``
    would give LoRA's ``B`` a random value instead of zeros. Call it after the base weights are loaded (DoRA's
    magnitude is the norm of the loaded weight) and before loading a trainable checkpoint to resume. Also
    recomputes OFT's (non-persistent) index buffers.

    Returns:
        The number of (layer, adapter) pairs reset.
    """
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.oft.layer import OFTLayer

    rules = ((LoraLayer, _reset_lora), (LoHaLayer, _reset_lycoris), (LoKrLayer, _reset_lycoris),
             (IA3Layer, _reset_ia3), (OFTLayer, _reset_oft))
    configs = getattr(_encoder_of(module), "peft_config", None) or getattr(module, "peft_config", None)
    count = 0
    for lname, layer in tuner_layers(module):
        rule = next((fn for cls, fn in rules if isinstance(layer, cls)), None)
        if rule is None:
            raise TypeError(f"reset_adapters: no rule for {type(layer).__name__} at {lname}")
        for name in _layer_adapters(layer):
            rule(layer, name, configs.get(name) if isinstance(configs, Mapping) else None)
            count += 1
    return count


# -- parameter report ---------------------------------------------------------------------------------------------


class PartCount(NamedTuple):
    """Trainable and total parameter counts of one part of a model."""

    trainable: int
    total: int


PARTS = ("backbone-base", "adapters", "neck", "decoder", "head", "aux_heads")


def _numel(p: Tensor) -> int:
    # DeepSpeed ZeRO-3 leaves 0-element placeholders and keeps the real size in ds_numel
    return int(getattr(p, "ds_numel", p.numel()))


def parameter_report(model: nn.Module) -> dict[str, PartCount]:
    """Trainable / total parameters per part (``PARTS``) plus ``total``; works on meta and sharded models.

    ``backbone-base`` is the encoder minus its adapters. Given a bare encoder, the other parts are zero.
    """
    counts = {part: [0, 0] for part in PARTS}

    def add(part: str, p: Tensor) -> None:
        counts[part][1] += _numel(p)
        counts[part][0] += _numel(p) if p.requires_grad else 0

    enc = _encoder_of(model)
    adapters = adapter_parameter_names(enc)
    for name, p in enc.named_parameters():
        add("adapters" if name in adapters else "backbone-base", p)
    if enc is not model:
        for part in PARTS[2:]:
            sub = getattr(model, part, None)
            for p in sub.parameters() if isinstance(sub, nn.Module) else ():
                add(part, p)
    report = {part: PartCount(*c) for part, c in counts.items()}
    report["total"] = PartCount(sum(c.trainable for c in report.values()), sum(c.total for c in report.values()))
    return report


def format_parameter_report(report: Mapping[str, PartCount]) -> str:
    """The report as an aligned text table (for logs)."""
    lines = [f"{'part':<14}{'trainable':>14}{'total':>14}"]
    lines += [f"{part:<14}{c.trainable:>14,}{c.total:>14,}" for part, c in report.items()]
    return "\n".join(lines)
