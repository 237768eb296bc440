"""TerraTorch checkpoints: read a Lightning ``.ckpt`` without TerraTorch installed, and load its weights into
a model built here from the same ``model_args`` (``--init-from``).

Our modules use TerraTorch's attribute names wherever that costs nothing (encoder blocks, split ``qkv`` with
peft's ``base_layer`` / ``lora_A.default`` names, necks ``fpn1..fpn4``, UperNet / FCN decoders), so most keys
are equal. The remaining differences are renamed here, each rule for a reason:

- ``encoder.base_model.model.*`` -> ``encoder.*``: TerraTorch wraps a PEFT encoder in a ``PeftModel``; ours
  injects the adapters in place (same inner names).
- ``encoder.*`` -> ``encoder.model.*``: TerraTorch's timm encoder is the timm model itself; ours wraps it.
- ``decoder._smp_decoder.*`` -> ``decoder.decoder.*``: smp decoders.
- ``head.head.<k>.*`` -> ``head.upscale|hidden|final.*`` and ``aux_heads.<name>.0|1.*`` ->
  ``aux_heads.<name>.decoder|head.*``: TerraTorch's heads are one ``nn.Sequential`` whose indices depend on the
  options, and its aux heads ``Sequential(decoder, head)``; ours name the parts. The table is made from our
  model's own heads (``encdec.models.terratorch_keys``), never guessed from the file.
- Tables we recompute from their definition (Prithvi's sin-cos ``pos_embed``, a function of the grid: a module
  lists them in ``recomputed_buffers``) are not read from the file, and a file without them is complete.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from encdec.models.safe_load import safe_torch_load
from encdec.models.terratorch_keys import rename_terratorch_head_keys

__all__ = [
    "CheckpointMismatch",
    "CheckpointReadError",
    "load_terratorch_weights",
    "map_terratorch_keys",
    "read_checkpoint",
]

LOG = logging.getLogger(__name__)
_SHOW = 10  # keys listed per kind in an error message


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be read, or holds no model weights."""


class CheckpointMismatch(ValueError):
    """A TerraTorch state dict does not fit the model (missing / unexpected keys, shape mismatches)."""


# ---------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The model weights of a TerraTorch (Lightning) checkpoint, with the task's ``model.`` prefix removed.

    Works without TerraTorch or Lightning installed and runs nothing from the file: classes and functions it
    names outside an allowlist (hyper-parameters, callbacks, or worse) are replaced by inert stand-ins
    (``encdec.models.safe_load``); only the tensors of ``state_dict`` are kept. A plain state-dict file works too.

    Args:
        path: a Lightning ``.ckpt`` or a ``torch.save``-d state dict.

    Raises:
        CheckpointReadError: missing or unreadable file, or no model weights in it (the message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint {path} does not exist or is not a file; pass the path of a .ckpt file")
    stubbed: list[str] = []
    try:
        # memory-mapped (zip files), as prithvi_load does: the launcher's pre-flight check only needs names and
        # shapes, and each worker copies the values into its own model anyway. Lightning pickles hyper-parameters
        # and callback states as objects of its own (and TerraTorch's) classes: they become inert stand-ins,
        # and nothing the file names is imported or run (a checkpoint from a hub or a colleague is untrusted).
        ckpt = safe_torch_load(path, stub_unknown=True, stubbed=stubbed)
    except Exception as err:
        raise CheckpointReadError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    stand_ins = f" (objects of {stubbed[:5]} were read as inert stand-ins)" if stubbed else ""
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping):
        raise CheckpointReadError(f"checkpoint {path} holds no state_dict (found {type(ckpt).__name__}){stand_ins}")
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, Tensor)}
    if any(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if not tensors:
        raise CheckpointReadError(
            f"checkpoint {path} has no model weights (expected tensors under 'model.'){stand_ins}"
        )
    return tensors


# ---------------------------------------------------------------------------------------------------- mapping
_PREFIX_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\."), ""),  # a state dict still carrying the Lightning task's prefix
    (re.compile(r"^encoder\.base_model\.model\."), "encoder."),  # TerraTorch's PeftModel around the encoder
    (re.compile(r"^encoder\."), "encoder.model."),  # timm encoders: ours wraps the timm model
    (re.compile(r"(^|\.)decoder\._smp_decoder\."), r"\1decoder.decoder."),  # smp decoders
)


def _candidates(key: str) -> list[str]:
    """Names ``key`` may have here, most literal first."""
    names = [key]
    for pattern, repl in _PREFIX_RULES:
        names += [pattern.sub(repl, n, count=1) for n in names if pattern.search(n)]
    return list(dict.fromkeys(names))


def _recomputed(model: nn.Module) -> set[str]:
    """Our keys whose value is recomputed, never read: non-persistent buffers and the persistent ones a module
    lists in ``recomputed_buffers`` (Prithvi's sin-cos ``pos_embed``, a fixed function of the grid)."""
    names = set()
    for mod_name, mod in model.named_modules():
        for buf in (*getattr(mod, "_non_persistent_buffers_set", ()), *getattr(mod, "recomputed_buffers", ())):
            names.add(f"{mod_name}.{buf}" if mod_name else buf)
    return names


def map_terratorch_keys(
    state_dict: Mapping[str, Tensor], model: nn.Module
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Rename a TerraTorch state dict's keys to ``model``'s.

    Returns:
        ``(mapped, unexpected, skipped)``: the tensors under our names, the TerraTorch keys that match nothing
        here, and those dropped on purpose (tables recomputed here from their definition, e.g. ``pos_embed``).
    """
    target = model.state_dict()
    fixed = _recomputed(model)
    renamed = rename_terratorch_head_keys(state_dict, model)  # heads: renamed from our heads' own layout
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    for (key, _), (new_key, value) in zip(state_dict.items(), renamed.items(), strict=True):
        names = _candidates(new_key)
        if any(n in fixed for n in names):
            skipped.append(key)
        elif (hit := next((n for n in names if n in target), None)) is not None:
            mapped[hit] = value
        else:
            unexpected.append(key)
    return mapped, unexpected, skipped


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"{title} ({len(items)}): {items[:_SHOW]}{more}"


def load_terratorch_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True) -> None:
    """Load a TerraTorch model's state dict (``read_checkpoint``'s result) into ``model``, mapping key names.

    Call it after building the model from the TerraTorch run's ``model_args`` (PEFT applied, so adapter keys
    exist) and before sharding.

    Args:
        model: our model (``encdec.build_model``), with real (not meta) tensors.
        state_dict: TerraTorch keys (with or without the Lightning ``model.`` prefix).
        strict: require every key of the model to be loaded and every checkpoint key to be used, with equal
            shapes. ``False`` loads the keys that fit and logs the rest.

    Raises:
        CheckpointMismatch: (strict) missing / unexpected keys or shape mismatches, first ``10`` of each listed.
    """
    mapped, unexpected, skipped = map_terratorch_keys(state_dict, model)
    target = model.state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    fixed = _recomputed(model)  # e.g. pos_embed: computed from the grid, so a file without it is complete
    missing = [k for k in target if k not in mapped and k not in fixed]
    problems = [
        _listing(title, items)
        for title, items in (
            ("missing in the checkpoint", missing),
            ("unexpected in the checkpoint", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    if problems and strict:
        raise CheckpointMismatch(
            "the TerraTorch checkpoint does not fit this model:\n  "
            + "\n  ".join(problems)
            + "\nBuild the model from the same model_args as the TerraTorch run (backbone and its options, necks, "
            "decoder and decoder_* options, head_*, num_classes, peft_config) or load with strict=False to take "
            "only the matching weights."
        )
    bad = {k.split(":", 1)[0] for k in shapes}
    loadable = {k: v for k, v in mapped.items() if k not in bad}
    model.load_state_dict(loadable, strict=False)
    if problems:
        LOG.warning("loaded %d of %d tensors from the TerraTorch checkpoint; %s", len(loadable), len(target),
                    "; ".join(problems))
    if skipped:
        LOG.info("not loaded (recomputed here): %s", skipped[:_SHOW])
