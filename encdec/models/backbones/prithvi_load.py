"""Loading official Prithvi-EO-2.0 checkpoints into ``PrithviViT`` encoders, strictly.

Accepted files (``torch.load(..., weights_only=True, mmap=True)``):

* the official MAE file (``Prithvi_EO_V2_300M.pt`` and friends): encoder keys under ``encoder.``; ``decoder.*``
  and ``mask_token`` are dropped;
* a plain backbone state dict (this encoder's or TerraTorch's ``PrithviViT``'s keys, no prefix); V1-style
  ``decoder_*``/``*_dec`` keys and ``mask_token`` are dropped.

``pos_embed`` is always recomputed (never read). Every other encoder key must be present with the right shape:
a missing, unexpected or misshapen key raises ``PrithviCheckpointError`` naming it, before anything is copied.
The patch embedding is re-mapped from the checkpoint's bands to the model's (new bands freshly initialised).

Loading goes through the encoder module's own ``load_state_dict(strict=False)`` so that modules which replace a
layer (the PEFT code's q/k/v split, peft's ``base_layer`` wrappers) receive the fused keys through their own
``_load_from_state_dict``; the strictness check is done here instead, ignoring adapter parameters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from encdec.models.backbones.prithvi_bands import Band, band_label
from encdec.models.backbones.prithvi_encoder import PrithviViT

__all__ = [
    "ADAPTER_MARKERS",
    "CheckpointSource",
    "PrithviCheckpointError",
    "PrithviWeightsUnavailableError",
    "encoder_state_dict_from_checkpoint",
    "load_checkpoint_into",
    "load_pretrained",
    "read_pretrained_state",
    "resolve_hf_file",
]

logger = logging.getLogger(__name__)

#: Substrings of parameter names that belong to PEFT adapters (never in a pretrained checkpoint).
ADAPTER_MARKERS = ("lora_", "hada_", "lokr_", "ia3_", "oft_", "boft_", "vera_", "lora_magnitude_vector")
_SHOW = 12  # keys listed per error category


class PrithviCheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the encoder (missing, unexpected or misshapen keys)."""


class PrithviWeightsUnavailableError(FileNotFoundError):
    """The pretrained weights are neither at ``ckpt_path`` nor obtainable from the Hugging Face cache/hub."""


@dataclass(frozen=True)
class CheckpointSource:
    """Where an encoder's weights come from: a local file, or an official file on the Hugging Face hub.

    Attributes:
        variant: registry name of the encoder (for messages).
        ckpt_path: local checkpoint file; wins over the hub.
        hf_repo: Hugging Face repo id of the official weights.
        hf_filename: file in that repo.
        pretrained_bands: bands of the checkpoint's patch embedding, in channel order.
    """

    variant: str
    ckpt_path: str | None = None
    hf_repo: str | None = None
    hf_filename: str | None = None
    pretrained_bands: tuple[Band, ...] = ()

    def resolve(self) -> Path:
        """The local file to read (downloading/looking up the hub cache if no ``ckpt_path``)."""
        if self.ckpt_path is not None:
            path = Path(self.ckpt_path).expanduser()
            if not path.is_file():
                raise PrithviWeightsUnavailableError(
                    f"ckpt_path={self.ckpt_path!r} for {self.variant!r} is not a file; give the path of the "
                    f"checkpoint (e.g. {self.hf_filename or 'the .pt file'}) as backbone_ckpt_path"
                )
            return path
        if self.hf_repo is None or self.hf_filename is None:
            raise PrithviWeightsUnavailableError(
                f"{self.variant!r} has no published weights; set pretrained=False or give ckpt_path=<local file>"
            )
        return resolve_hf_file(self.hf_repo, self.hf_filename, self.variant)

    def describe(self) -> str:
        return self.ckpt_path if self.ckpt_path is not None else f"hf://{self.hf_repo}/{self.hf_filename}"


# -- finding the file -------------------------------------------------------------------------------------------
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hf_cache_dir() -> Path:
    # Read the environment at call time: huggingface_hub freezes its constants at import, so a process (or
    # test) that sets HF_HOME later would otherwise be ignored.
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_hf_file(repo_id: str, filename: str, variant: str) -> Path:
    """Path of ``filename`` from ``repo_id``: the local cache first, then a download unless ``HF_HUB_OFFLINE``.

    Raises:
        PrithviWeightsUnavailableError: naming ``ckpt_path``, the repo and the file to fetch.
    """
    from huggingface_hub import hf_hub_download

    cache = _hf_cache_dir()
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=True))
    except FileNotFoundError as e:  # LocalEntryNotFoundError is one
        cause: Exception = e
    if _env_true("HF_HUB_OFFLINE"):
        why = "HF_HUB_OFFLINE is set, so nothing is downloaded"
    else:
        try:
            return Path(hf_hub_download(repo_id, filename, cache_dir=cache))
        except Exception as e:  # network/HTTP errors come in many types; the cause is chained below
            cause = e
            why = f"the download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    raise PrithviWeightsUnavailableError(
        f"pretrained weights for {variant!r} are not available: {filename} from the Hugging Face repo {repo_id} "
        f"is not in the cache {cache} and {why}. Fetch it where a network exists (`hf download {repo_id} "
        f"{filename}`) and pass its path as ckpt_path (backbone_ckpt_path in the model args), or put it in the "
        "Hugging Face cache (HF_HOME)."
    ) from cause


# -- reading and mapping ----------------------------------------------------------------------------------------
def read_pretrained_state(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a pretrained weights file, memory-mapped, with ``weights_only`` (no code runs from the file); a
    TerraTorch fine-tuned checkpoint is read by ``encdec.models.terratorch_ckpt.read_checkpoint`` instead.

    A top-level ``state_dict`` / ``model`` entry holding the tensors is unwrapped.
    """
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise PrithviCheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: {e}); it must be a torch.save'd state dict "
            "(zip format) of tensors"
        ) from e
    if isinstance(raw, Mapping) and not any(isinstance(v, Tensor) for v in raw.values()):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping):
        raise PrithviCheckpointError(f"checkpoint {str(path)!r} holds a {type(raw).__name__}, not a state dict")
    bad = [k for k, v in raw.items() if not isinstance(v, Tensor)]
    if bad:
        raise PrithviCheckpointError(
            f"checkpoint {str(path)!r} has non-tensor entries {bad[:_SHOW]}; expected a state dict of tensors"
        )
    return dict(raw)


def _is_decoder_key(key: str) -> bool:
    head = key.split(".", 1)[0]
    return head == "mask_token" or head.startswith("decoder") or head.endswith("_dec")


def encoder_state_dict_from_checkpoint(
    state: Mapping[str, Tensor], encoder: PrithviViT
) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """Map a checkpoint's keys to the encoder's (official MAE layout or plain backbone layout).

    Returns:
        ``(mapped, unexpected, origin)``: the encoder's entries; checkpoint keys that belong to neither the
        encoder nor the parts dropped on purpose (decoder, ``mask_token``, ``pos_embed``); and, for messages,
        the file's key of each mapped key.
    """
    mae_layout = any(k.startswith("encoder.") for k in state)
    mapped: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    dropped: list[str] = []
    for raw_key, value in state.items():
        key = raw_key.replace("_timm_module.", "")  # TerraTorch's older wrapper prefix
        if mae_layout:
            if key.startswith("encoder."):
                key = key[len("encoder.") :]
            elif key.startswith("decoder.") or key == "mask_token":
                dropped.append(raw_key)
                continue
            else:
                unexpected.append(raw_key)
                continue
        elif _is_decoder_key(key):
            dropped.append(raw_key)
            continue
        if key == "pos_embed":  # fixed sin-cos table; recomputed for this encoder's grid
            continue
        if (key.startswith("temporal_embed_enc.") and not encoder.temporal_encoding) or (
            key.startswith("location_embed_enc.") and not encoder.location_encoding
        ):
            dropped.append(raw_key)  # a _tl checkpoint used by a variant without coordinate encodings
            continue
        mapped[key] = value
        origin[key] = raw_key
    if dropped:
        logger.debug("prithvi: %d checkpoint keys not used by the encoder (decoder etc.)", len(dropped))
    return mapped, unexpected, origin


def _select_band_weights(
    weight: Tensor, target_shape: torch.Size, pretrained: Sequence[Band], model: Sequence[Band], path: str
) -> Tensor:
    """The patch-embedding weight for the model's bands: known bands copied, new ones xavier-initialised."""
    key = "patch_embed.proj.weight"
    if weight.dim() != len(target_shape) or weight.shape[:1] + weight.shape[2:] != target_shape[:1] + target_shape[2:]:
        raise PrithviCheckpointError(
            f"checkpoint {path!r}: {key} has shape {list(weight.shape)} but the model needs {list(target_shape)} "
            "(channels may differ; embed dim and patch size may not): the checkpoint is for another variant or "
            "patch size"
        )
    if weight.shape[1] != len(pretrained):
        raise PrithviCheckpointError(
            f"checkpoint {path!r}: {key} has {weight.shape[1]} input channels but pretrained_bands lists "
            f"{len(pretrained)} bands {[band_label(b) for b in pretrained]}; pass pretrained_bands naming the "
            "checkpoint's bands in order"
        )
    if list(pretrained) == list(model):
        return weight
    out = torch.empty(target_shape, dtype=weight.dtype)
    torch.nn.init.xavier_uniform_(out.view(out.shape[0], -1))
    known = 0
    for i, band in enumerate(model):
        if band in pretrained:
            out[:, i] = weight[:, list(pretrained).index(band)]
            known += 1
    if known == 0:
        logger.warning(
            "prithvi: none of the bands %s is among the pretrained bands %s; the patch embedding starts from "
            "random weights", [band_label(b) for b in model], [band_label(b) for b in pretrained]
        )
    return out


def _has_own_loader(module: nn.Module) -> bool:
    return type(module)._load_from_state_dict is not nn.Module._load_from_state_dict


def _route_keys(
    mapped: dict[str, Tensor], encoder: nn.Module, target: Mapping[str, Tensor], origin: Mapping[str, str]
) -> tuple[dict[str, Tensor], list[str], list[str], set[str]]:
    """Send each key to its destination: itself, a peft ``base_layer`` wrapper, or a module with its own
    loader (fused qkv into a split module). Returns ``(routed, unexpected, misshapen, split_prefixes)``, the
    problems named by the file's keys."""
    routed: dict[str, Tensor] = {}
    unexpected: list[str] = []
    misshapen: list[str] = []
    split: set[str] = set()
    for key, value in mapped.items():
        dest = key
        if dest not in target and "." in key:
            prefix, leaf = key.rsplit(".", 1)
            wrapped = f"{prefix}.base_layer.{leaf}"
            if wrapped in target:
                dest = wrapped
            else:
                try:
                    owner = encoder.get_submodule(prefix)
                except AttributeError:
                    owner = None
                if owner is not None and _has_own_loader(owner):
                    routed[key] = value  # its own _load_from_state_dict splits it; shapes are its business
                    split.add(prefix + ".")
                    continue
        if dest not in target:
            unexpected.append(origin.get(key, key))
            continue
        if tuple(value.shape) != tuple(target[dest].shape):
            misshapen.append(f"{origin.get(key, key)}: checkpoint {list(value.shape)} vs model {list(target[dest].shape)}")
            continue
        routed[dest] = value
    return routed, unexpected, misshapen, split


def _to_dtensor_pre_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: a plain full tensor aimed at one of ``module``'s DTensor parameters becomes a DTensor
    with that parameter's mesh and placements. Runs just before the module copies its own tensors, i.e. after
    parents (a q/k/v split) have written the keys, so split and wrapped layers are covered too."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, like in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        key = prefix + name
        value = state_dict.get(key)
        if isinstance(like, DTensor) and isinstance(value, Tensor) and not isinstance(value, DTensor):
            full = value.to(device=like.device_mesh.device_type, dtype=like.dtype)
            # Every rank reads the same file, so each takes its own shard locally: no communication.
            state_dict[key] = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def _dtensor_loading(module: nn.Module) -> Iterator[None]:
    """While active, full checkpoint tensors load into FSDP2-sharded (DTensor) parameters."""
    # No DTensor can exist unless its module was imported; importing it here would cost seconds for nothing.
    dtensor_mod = sys.modules.get("torch.distributed.tensor")
    handles = []
    if dtensor_mod is not None:
        for m in module.modules():
            own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if any(isinstance(t, dtensor_mod.DTensor) for t in own):
                handles.append(m.register_load_state_dict_pre_hook(_to_dtensor_pre_hook))
    try:
        yield
    finally:
        for h in handles:  # temporary: the model keeps no hook (it must still pickle)
            h.remove()


_COORD_PREFIXES = ("temporal_embed_enc.", "location_embed_enc.")


def _fail(path: str, variant: str, missing: list[str], unexpected: list[str], misshapen: list[str]) -> None:
    def show(keys: list[str]) -> str:
        more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
        return ", ".join(keys[:_SHOW]) + more

    parts = []
    if missing:
        hint = ""
        if any(k.startswith(("temporal_embed_enc.", "location_embed_enc.")) for k in missing):
            hint = " (the checkpoint has no coordinate encoders: use the variant without _tl)"
        parts.append(f"missing encoder keys{hint}: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    if misshapen:
        parts.append(f"misshapen keys: {show(misshapen)}")
    raise PrithviCheckpointError(
        f"checkpoint {path!r} does not match the {variant} encoder; " + "; ".join(parts) + ". Check that the "
        "file is the official checkpoint of this variant (or a state dict of it) and that embed dim, depth and "
        "patch size agree; nothing was loaded."
    )


def load_checkpoint_into(encoder: PrithviViT, source: CheckpointSource, path: Path | None = None) -> Path:
    """Load ``source`` into ``encoder`` (materialised, possibly PEFT-modified or FSDP2-sharded).

    ``path`` is ``source.resolve()`` when the caller already resolved it.

    Returns:
        The file that was read.

    Raises:
        PrithviWeightsUnavailableError: the file cannot be found or fetched.
        PrithviCheckpointError: unreadable file, or missing / unexpected / misshapen encoder keys.
    """
    if encoder.is_meta:
        raise RuntimeError(
            f"the {source.variant} encoder is still on the meta device; materialise it first "
            "(model.to_empty(device=...)) and then call load_pretrained(model)"
        )
    path = source.resolve() if path is None else path
    variant = source.variant
    mapped, unexpected, origin = encoder_state_dict_from_checkpoint(read_pretrained_state(path), encoder)
    target = encoder.state_dict()
    pe_key = "patch_embed.proj.weight"
    pe_dest = pe_key if pe_key in target else "patch_embed.proj.base_layer.weight"
    if pe_key in mapped and pe_dest in target:
        mapped[pe_key] = _select_band_weights(
            mapped[pe_key], target[pe_dest].shape, source.pretrained_bands or encoder.bands, encoder.bands, str(path)
        )
    routed, more_unexpected, misshapen, split = _route_keys(mapped, encoder, target, origin)
    unexpected += more_unexpected

    def provided(key: str) -> bool:
        return (
            key in routed
            or key in encoder.recomputed_buffers  # pos_embed: recomputed for this grid, never read
            # coordinate encodings a config adds to a variant trained without them (TerraTorch loads non-strictly
            # there); a _tl variant still needs them in its file
            or (key.startswith(_COORD_PREFIXES) and encoder.coords_added and not any(
                k.startswith(_COORD_PREFIXES) for k in routed))
            or any(m in key for m in ADAPTER_MARKERS)
            or any(key.startswith(p) for p in split)
        )

    missing = [k for k in target if not provided(k)]
    if missing or unexpected or misshapen:
        _fail(str(path), variant, missing, unexpected, misshapen)

    try:
        with _dtensor_loading(encoder):
            result = encoder.load_state_dict(routed, strict=False)
    except RuntimeError as e:  # errors reported by modules' own loaders (e.g. a fused qkv that cannot be split)
        raise PrithviCheckpointError(f"checkpoint {str(path)!r}: loading into the {variant} encoder failed: {e}") from e
    late_missing = [k for k in result.missing_keys if not provided(k)]
    if late_missing or result.unexpected_keys:
        _fail(str(path), variant, late_missing, list(result.unexpected_keys), [])
    encoder.reset_pos_embed()
    if encoder.coords_added and not any(k.startswith(_COORD_PREFIXES) for k in routed):
        with torch.no_grad():  # materialised from meta: give the encodings the file lacks their initial scale
            for name in ("temporal_embed_enc", "location_embed_enc"):
                module = getattr(encoder, name, None)
                if module is not None:
                    module.scale.fill_(0.1 if module.trainable_scale else 1.0)
    logger.info("prithvi: loaded %s into the %s encoder", path, variant)
    return path


def load_pretrained(model: nn.Module) -> list[str]:
    """Load every Prithvi encoder in ``model`` that was built on meta with pretrained weights pending.

    Call after materialisation (``model.to_empty(device=...)``, after sharding if any). Encoders without a
    pending checkpoint are left alone. Idempotent: a loaded encoder forgets its pending source.

    Returns:
        ``"<module name> <- <file>"`` for each encoder loaded (empty if none was pending).
    """
    loaded: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, PrithviViT) and module.pending_checkpoint is not None:
            path = load_checkpoint_into(module, module.pending_checkpoint)
            module.pending_checkpoint = None
            loaded.append(f"{name or '<root>'} <- {path}")
    return loaded
