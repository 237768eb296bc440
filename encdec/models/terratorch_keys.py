"""Key names of TerraTorch's task heads and auxiliary heads, and ours (used by ``--init-from``).

TerraTorch builds each head as one ``nn.Sequential`` named ``head`` whose indices depend on the options:

- ``SegmentationHead``: ``[pre_head, dropout, final]``; ``pre_head`` is Identity or ``channel_list`` blocks
  ``Sequential(Conv2d(bias), ReLU)``.
- ``RegressionHead``: ``[upscale?, pre_head?, dropout, final]``; ``upscale`` holds ``learned_upscale_layers``
  ``PixelShuffleUpscale`` (``conv``, ``bn``), ``pre_head`` the ``channel_list`` blocks
  ``Sequential(Conv2d(no bias), BatchNorm2d, ReLU)``; each is present only when configured.
- ``ScalarHead`` (classification / scalar regression): ``[pre_head, dropout, final]``; blocks
  ``Sequential(Linear, ReLU)``.

Ours name the parts (``upscale``, ``hidden`` flat with three modules per block, ``final``), so every key is
renamed from the head's own configuration rather than guessed from the checkpoint. Auxiliary heads are
``Sequential(decoder, head)`` in TerraTorch (``aux_heads.<name>.0`` / ``.1``) and ``AuxiliaryHeadModule`` here
(``aux_heads.<name>.decoder`` / ``.head``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from encdec.models.heads import ClassificationHead, RegressionHead, SegmentationHead

__all__ = ["head_key_table", "rename_terratorch_head_keys"]

_BLOCK = 3  # modules per block in our heads' flat ``hidden``


def _head_table(head: nn.Module) -> dict[str, str]:
    """TerraTorch's key suffixes (after ``head.``) -> ours (after ``head.``) for one of our heads."""
    own = list(head.state_dict())
    table: dict[str, str] = {}
    k = 0  # index in TerraTorch's Sequential
    if isinstance(head, RegressionHead) and len(head.upscale):
        for key in own:
            if key.startswith("upscale."):
                table[f"head.0.{key[len('upscale.'):]}"] = key
        k += 1
    hidden = [key for key in own if key.startswith("hidden.")]
    if hidden or not isinstance(head, RegressionHead):  # TerraTorch's regression head omits an empty pre_head
        for key in hidden:
            index, _, rest = key[len("hidden.") :].partition(".")
            block, part = divmod(int(index), _BLOCK)
            table[f"head.{k}.{block}.{part}.{rest}"] = key
        k += 1
    k += 1  # dropout (no parameters)
    for key in own:
        if key.startswith("final."):
            table[f"head.{k}.{key[len('final.'):]}"] = key
    return table


def head_key_table(model: nn.Module) -> dict[str, str]:
    """Every TerraTorch head key of a model built like ``model`` -> ``model``'s key (main and auxiliary heads)."""
    heads: dict[str, tuple[str, nn.Module]] = {}  # TerraTorch prefix -> (our prefix, head)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        heads["head."] = ("head.", head)
    for name, aux in getattr(model, "aux_heads", {}).items():
        aux_head = getattr(aux, "head", None)
        if isinstance(aux_head, nn.Module):
            heads[f"aux_heads.{name}.1."] = (f"aux_heads.{name}.head.", aux_head)
    table: dict[str, str] = {}
    for tt_prefix, (our_prefix, module) in heads.items():
        if isinstance(module, (SegmentationHead, RegressionHead, ClassificationHead)):
            for tt_key, our_key in _head_table(module).items():
                table[tt_prefix + tt_key] = our_prefix + our_key
    return table


def rename_terratorch_head_keys(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A TerraTorch state dict with its head keys (and auxiliary decoders' ``aux_heads.<name>.0.`` prefix) renamed
    to ``model``'s; every other key unchanged, with or without Lightning's ``model.`` prefix. Idempotent, so
    ``map_terratorch_keys`` can apply it to any state dict first.
    """
    table = head_key_table(model)
    aux_names = list(getattr(model, "aux_heads", {}))
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        bare = key[len("model.") :] if key.startswith("model.") else key
        new = table.get(bare)
        if new is None:
            for name in aux_names:
                tt = f"aux_heads.{name}.0."
                if bare.startswith(tt):
                    new = f"aux_heads.{name}.decoder." + bare[len(tt) :]
                    break
        out[new if new is not None else key] = value
    return out
