"""Exporting PEFT models: merged plain weights, the official Prithvi layout, and adapter-only checkpoints.

* :func:`merge_and_export` -> the state dict of the same model built *without* ``peft_config``: adapters merged
  into the base weights (with peft's own per-layer ``merge``), q/k/v re-fused into ``qkv``. It loads with
  ``strict=True`` into a fresh plain model and gives the adapted model's outputs.
* :func:`to_official_prithvi` -> the backbone part of such a state dict in the official checkpoint layout
  (``encoder.`` keys), which our Prithvi loader and TerraTorch's read.
* :func:`trainable_state_dict` / :func:`load_trainable_state_dict` -> only what trains (adapters, neck, decoder,
  head, auxiliary heads, with their buffers such as BatchNorm statistics): a small file per fine-tune of a
  shared base.

All take a plain (unsharded) model: the engine gathers a full state dict from a sharded one first. None of them
changes the model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from encdec.models.peft import QKVSep, _layer_adapters, adapter_state_keys, is_adapter_key, tuner_layers

__all__ = [
    "ExportError",
    "load_trainable_state_dict",
    "merge_and_export",
    "to_official_prithvi",
    "trainable_state_dict",
]

#: TerraTorch wraps the PEFT backbone in a PeftModel: its checkpoints hold ``encoder.base_model.model.`` keys.
_PEFTMODEL_INFIX = "base_model.model."


class ExportError(ValueError):
    """A state dict cannot be exported or loaded as asked."""


def _under(key: str, prefix: str) -> bool:
    return key.startswith(prefix + ".") if prefix else True


@torch.no_grad()
def _merged_base_state(layer: Any) -> dict[str, Tensor]:
    """State of the plain layer equal to ``layer`` with its active adapters merged (``layer`` is left as is)."""
    tmp = copy.deepcopy(layer)  # one Linear and its adapters: small, and merging must not touch the live model
    adapters = [a for a in tmp.active_adapters if a in _layer_adapters(tmp)]
    if adapters and not tmp.disable_adapters:
        tmp.merge(safe_merge=True, adapter_names=adapters)
    return {k: v.detach() for k, v in tmp.get_base_layer().state_dict().items()}


@torch.no_grad()
def merge_and_export(model: nn.Module) -> dict[str, Tensor]:
    """Merge adapters, re-fuse q/k/v and return the plain model's state dict.

    Args:
        model: a plain (unsharded) model or encoder, with or without PEFT.

    Returns:
        An ordered state dict with the keys of the same model built without ``peft_config``.
    """
    full = model.state_dict()
    merged: dict[str, dict[str, Tensor]] = {name: _merged_base_state(layer) for name, layer in tuner_layers(model)}
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for key, value in full.items():
        owner = next((n for n in merged if _under(key, n)), None)
        if owner is None:
            out[key] = value.detach()
        elif owner not in done:
            done.add(owner)
            pre = f"{owner}." if owner else ""
            out.update((pre + k, v) for k, v in merged[owner].items())
    return _refuse_qkv(model, out)


_QKV_PARTS = ("q_linear", "k_linear", "v_linear")


def _refuse_qkv(model: nn.Module, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace each QKVSep's ``{q,k,v}_linear.{weight,bias}`` with the fused ``weight``/``bias``, in key order."""
    seps = [n for n, m in model.named_modules() if isinstance(m, QKVSep)]
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        sep = next((n for n in seps if _under(key, n)), None)
        if sep is None:
            out[key] = value
            continue
        pre = f"{sep}." if sep else ""
        part, _, kind = key[len(pre) :].partition(".")
        if part not in _QKV_PARTS or kind not in ("weight", "bias"):
            raise ExportError(f"cannot re-fuse {key}: the QKVSep at {sep!r} holds an entry other than q/k/v weights")
        if part == "q_linear":
            out[pre + kind] = torch.cat([sd[f"{pre}{p}.{kind}"] for p in _QKV_PARTS], dim=0)
    return out


def to_official_prithvi(
    state_dict: Mapping[str, Tensor], *, img_size: int = 224, num_frames: int = 1
) -> dict[str, Tensor]:
    """The backbone part of a plain model state dict in the official Prithvi checkpoint layout.

    Our models keep the backbone under ``encoder.`` with the official module names, so this keeps the
    ``encoder.`` entries, checks that they are plain (merged, fused) and sets ``encoder.pos_embed`` to the fixed
    sin-cos table of the official grid (our encoder stores the table of its own ``img_size``, and state dicts of
    round 1 have none; every loader recomputes it, but the official files hold it at 224 x 224 and TerraTorch's
    loader expects it). The result loads like ``Prithvi_EO_V2_300M.pt``.

    Args:
        state_dict: from :func:`merge_and_export` (or a model built without PEFT).
        img_size, num_frames: grid the stored ``pos_embed`` is built for (the official 224, 1).

    Raises:
        ExportError: no ``encoder.`` entries, or PEFT/split entries left (call :func:`merge_and_export` first).
    """
    enc = {k: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if not enc:
        raise ExportError(
            "the state dict has no 'encoder.' entries; pass the state dict of a whole factory model "
            "(merge_and_export(model)), not of the encoder alone"
        )
    split = tuple(f".{p}." for p in _QKV_PARTS)
    left = [k for k in enc if ".base_layer." in k or _PEFTMODEL_INFIX in k or is_adapter_key(k) or any(s in k for s in split)]
    if left:
        raise ExportError(
            f"the state dict still has PEFT or split-qkv entries ({sorted(left)[:3]}...); export it with "
            "merge_and_export(model) first"
        )
    proj, cls = enc.get("encoder.patch_embed.proj.weight"), enc.get("encoder.cls_token")
    if proj is not None and cls is not None and proj.dim() == 5:
        from encdec.models.backbones.prithvi_pos import sincos_3d_pos_embed

        pt, ph, pw = proj.shape[2:]
        grid = (num_frames // pt, img_size // ph, img_size // pw)
        enc["encoder.pos_embed"] = sincos_3d_pos_embed(int(cls.shape[-1]), grid, dtype=cls.dtype)
    return enc


def _trainable_keys(model: nn.Module) -> list[str]:
    """Keys :func:`trainable_state_dict` holds: all but the frozen base of the backbone."""
    full = model.state_dict(keep_vars=True)
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ExportError(
            f"{type(model).__name__} has no `encoder`; trainable_state_dict takes a factory model "
            "(encoder/neck/decoder/head)"
        )
    adapters = {"encoder." + k for k in adapter_state_keys(encoder)}
    keys = []
    for key, value in full.items():
        if not key.startswith("encoder."):
            keys.append(key)  # neck, decoder, head, aux heads: parameters and buffers (BatchNorm statistics)
        elif key in adapters or (isinstance(value, nn.Parameter) and value.requires_grad):
            keys.append(key)  # adapters, and backbone tensors a config made trainable (e.g. LoRA bias="all")
    return keys


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a fine-tune changes: adapters, trainable backbone tensors, neck, decoder, head, aux heads.

    Args:
        model: a plain (unsharded) factory model.

    Returns:
        A state dict (detached tensors, shared with the model) that :func:`load_trainable_state_dict` restores
        onto a model built with the same arguments and loaded with the same base weights.
    """
    full = model.state_dict()
    return {k: full[k].detach() for k in _trainable_keys(model)}


def _normalise_key(key: str) -> str:
    # TerraTorch's PeftModel wrapper puts the backbone under encoder.base_model.model.
    if key.startswith("encoder." + _PEFTMODEL_INFIX):
        return "encoder." + key[len("encoder." + _PEFTMODEL_INFIX) :]
    return key


def load_trainable_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load an adapter-only state dict onto a model built with the same arguments (base weights loaded).

    Accepts TerraTorch's PEFT keys (``encoder.base_model.model.``) too.

    Returns:
        The keys loaded.

    Raises:
        ExportError: keys the model does not have, or trainable keys missing from ``state_dict`` (each listed).
        RuntimeError: shape mismatches (from ``load_state_dict``).
    """
    sd = {_normalise_key(k): v for k, v in state_dict.items()}
    own = set(model.state_dict())
    expected = set(_trainable_keys(model))
    unexpected = sorted(set(sd) - own)
    missing = sorted(expected - set(sd))
    if unexpected or missing:
        raise ExportError(
            f"trainable state dict does not fit {type(model).__name__}: unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}), missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}); build the model with the same backbone, necks, "
            "decoder and peft_config as the run that saved it"
        )
    model.load_state_dict(sd, strict=False)
    return sorted(sd)
