"""The fused-qkv split: every ``Linear(D, 3D)`` named by ``replace_qkv`` becomes a :class:`QKVSep` with
``q_linear``/``k_linear``/``v_linear`` (same output, same state-dict loading of the fused keys), so PEFT can target
q and v alone."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from encdec.models.peft.config import PeftConfigError

__all__ = ["QKVSep", "replace_qkv"]

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


