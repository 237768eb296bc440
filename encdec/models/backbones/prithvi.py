"""Prithvi-EO-2.0 backbones in the backbone registry, built the way a TerraTorch user configures them.

    BACKBONE_REGISTRY.build("prithvi_eo_v2_300", pretrained=True, bands=["BLUE", "GREEN", "RED"], num_frames=1)

Registered names and what their metadata says (readable without building anything, e.g.
``BACKBONE_REGISTRY.metadata("prithvi_eo_v2_600")["num_params"]``): ``embed_dim``, ``depth``, ``num_heads``,
``patch_size`` (t, h, w), ``bands`` (default input bands), ``fused_qkv`` (``"attn.qkv"``), ``num_params`` (with the
default six bands), ``img_size``, ``num_frames``, ``coords``, ``hf_repo``/``hf_filename``, ``means``/``stds``.

Weights: ``pretrained=True`` loads ``ckpt_path`` if given, else the official file through the Hugging Face cache
(or a download where a network exists). Built on a real device the weights are loaded at once; built under
``torch.device("meta")`` the encoder keeps the source and ``load_pretrained(model)`` loads it after
``model.to_empty(...)``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from encdec.config import HLS_MEANS, HLS_STDS
from encdec.models.backbones.prithvi_bands import DEFAULT_BANDS, normalize_bands
from encdec.models.backbones.prithvi_encoder import PrithviViT
from encdec.models.backbones.prithvi_load import (
    CheckpointSource,
    PrithviCheckpointError,
    PrithviWeightsUnavailableError,
    load_checkpoint_into,
    load_pretrained,
)
from encdec.registry import BACKBONE_REGISTRY

__all__ = [
    "PRITHVI_MEANS",
    "PRITHVI_STDS",
    "VARIANTS",
    "PrithviCheckpointError",
    "PrithviVariant",
    "PrithviViT",
    "PrithviWeightsUnavailableError",
    "build_prithvi",
    "load_pretrained",
]

#: Per-band statistics published with Prithvi-EO-2.0 (HLS reflectance x 1e4), in DEFAULT_BANDS order.
PRITHVI_MEANS = HLS_MEANS
PRITHVI_STDS = HLS_STDS
_TL = ("time", "location")


@dataclass(frozen=True)
class PrithviVariant:
    """Architecture of one registered variant and where its official weights live."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: tuple[int, int, int] = (1, 16, 16)
    coords: tuple[str, ...] = ()
    hf_repo: str | None = None
    hf_filename: str | None = None
    mlp_ratio: float = 4.0
    img_size: int = 224

    def num_params(self, in_chans: int = len(DEFAULT_BANDS)) -> int:
        """Parameter count by formula (equals a meta build's): patch embedding, cls token, blocks, final norm,
        coordinate scales."""
        d, hidden = self.embed_dim, int(self.embed_dim * self.mlp_ratio)
        t, h, w = self.patch_size
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
        return d * in_chans * t * h * w + d + d + self.depth * block + 2 * d + len(self.coords)

    def metadata(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "patch_size": self.patch_size,
            "bands": DEFAULT_BANDS,
            "fused_qkv": "attn.qkv",
            "num_params": self.num_params(),
            "img_size": self.img_size,
            "num_frames": 1,
            "coords": self.coords,
            "hf_repo": self.hf_repo,
            "hf_filename": self.hf_filename,
            "means": PRITHVI_MEANS,
            "stds": PRITHVI_STDS,
        }


_HF = "ibm-nasa-geospatial/"
VARIANTS: dict[str, PrithviVariant] = {
    v.name: v
    for v in (
        PrithviVariant("prithvi_eo_tiny", 256, 4, 4),
        PrithviVariant("prithvi_eo_v2_tiny_tl", 192, 12, 3, coords=_TL,
                       hf_repo=_HF + "Prithvi-EO-2.0-tiny-TL", hf_filename="Prithvi_EO_V2_tiny_TL.pt"),
        PrithviVariant("prithvi_eo_v2_100_tl", 768, 12, 12, coords=_TL,
                       hf_repo=_HF + "Prithvi-EO-2.0-100M-TL", hf_filename="Prithvi_EO_V2_100M_TL.pt"),
        PrithviVariant("prithvi_eo_v2_300", 1024, 24, 16,
                       hf_repo=_HF + "Prithvi-EO-2.0-300M", hf_filename="Prithvi_EO_V2_300M.pt"),
        PrithviVariant("prithvi_eo_v2_300_tl", 1024, 24, 16, coords=_TL,
                       hf_repo=_HF + "Prithvi-EO-2.0-300M-TL", hf_filename="Prithvi_EO_V2_300M_TL.pt"),
        PrithviVariant("prithvi_eo_v2_600", 1280, 32, 16, patch_size=(1, 14, 14),
                       hf_repo=_HF + "Prithvi-EO-2.0-600M", hf_filename="Prithvi_EO_V2_600M.pt"),
        PrithviVariant("prithvi_eo_v2_600_tl", 1280, 32, 16, patch_size=(1, 14, 14), coords=_TL,
                       hf_repo=_HF + "Prithvi-EO-2.0-600M-TL", hf_filename="Prithvi_EO_V2_600M_TL.pt"),
    )
}

_KWARGS = (
    "pretrained", "ckpt_path", "bands", "pretrained_bands", "num_frames", "img_size", "drop_path_rate",
    "drop_path", "encoder_only", "out_indices", "in_chans", "in_channels", "coords_encoding", "coords_scale_learn",
    "patch_size",
)


def build_prithvi(
    variant: str,
    *,
    pretrained: bool = False,
    ckpt_path: str | None = None,
    bands: Sequence[Any] | None = None,
    pretrained_bands: Sequence[Any] | None = None,
    num_frames: int = 1,
    img_size: int | Sequence[int] = 224,
    drop_path_rate: float | None = None,
    drop_path: float | None = None,
    encoder_only: bool = True,
    out_indices: Sequence[int] | None = None,
    in_chans: int | None = None,
    in_channels: int | None = None,
    coords_encoding: Sequence[str] | None = None,
    coords_scale_learn: bool | None = None,
    patch_size: int | Sequence[int] | None = None,
    **unsupported: Any,
) -> PrithviViT:
    """Build a Prithvi-EO-2.0 encoder (the registered names call this with their variant).

    Args:
        variant: one of ``VARIANTS``.
        pretrained: load weights: ``ckpt_path`` if given, else the official file via Hugging Face.
        ckpt_path: local checkpoint (official MAE file or a plain encoder state dict). Ignored, with a warning,
            when ``pretrained`` is False (as in TerraTorch).
        bands: input bands in channel order (HLS names or ints; default the six pretrained bands). Bands the
            checkpoint knows get their pretrained patch-embedding weights; others start fresh.
        pretrained_bands: the checkpoint's bands (default the six HLS bands of Prithvi-EO-2.0).
        num_frames: frames per sample (the position embedding covers them).
        img_size: image size the position embedding is built for; other input sizes are interpolated.
        drop_path_rate: stochastic depth, same rate in every block. ``drop_path`` is TerraTorch's name for it.
        encoder_only: must be True (the MAE decoder is not built).
        out_indices: blocks whose outputs forward returns (default all).
        in_chans: accepted only if equal to ``len(bands)`` (older configs pass it); ``in_channels`` is
            TerraTorch's name for it.
        coords_encoding: ``["time"]``, ``["location"]``, both or ``[]``; default the variant's (both for ``_tl``).
            A checkpoint without the encodings (non-``_tl``) leaves them at their initial scale, as TerraTorch.
        patch_size: (t, h, w) tubelet, or an int for (1, p, p); default the variant's (a pretrained file must
            have been trained with it).
        coords_scale_learn: learnable coordinate scales; default True for ``_tl`` variants, else False (a fixed
            1.0), TerraTorch's defaults.

    Raises:
        TypeError: an argument this builder does not take.
        ValueError: inconsistent arguments (each message names the argument and the fix).
        PrithviWeightsUnavailableError, PrithviCheckpointError: from loading (real-device builds).
    """
    spec = VARIANTS[variant]
    if unsupported:
        raise TypeError(
            f"{variant} got unsupported arguments {sorted(unsupported)}; it takes {', '.join(_KWARGS)} "
            "(TerraTorch's vit_adapter/vpt options are not implemented here)"
        )
    if not encoder_only:
        raise ValueError(
            f"{variant}: encoder_only=False (the full MAE with its decoder) is not supported; fine-tuning uses "
            "the encoder only, so drop encoder_only or set it to True"
        )
    if drop_path is not None and drop_path_rate is not None:
        raise ValueError(f"{variant}: give drop_path_rate or its TerraTorch alias drop_path, not both")
    rate = drop_path_rate if drop_path_rate is not None else (drop_path or 0.0)
    model_bands = normalize_bands(bands, "bands")
    ckpt_bands = normalize_bands(pretrained_bands, "pretrained_bands")
    if in_chans is not None and in_channels is not None and in_chans != in_channels:
        raise ValueError(f"{variant}: in_chans={in_chans} and in_channels={in_channels} disagree; give one of them")
    in_chans = in_chans if in_chans is not None else in_channels
    coords = spec.coords if coords_encoding is None else tuple(coords_encoding)
    if isinstance(coords_encoding, str):
        raise ValueError(f"{variant}: coords_encoding must be a list such as ['time', 'location'], got {coords_encoding!r}")
    scale_learn = bool(spec.coords) if coords_scale_learn is None else bool(coords_scale_learn)
    if in_chans is not None and in_chans != len(model_bands):
        raise ValueError(
            f"{variant}: in_chans={in_chans} disagrees with the {len(model_bands)} bands {model_bands}; the channel "
            "count comes from bands, so drop in_chans or list the bands"
        )

    source: CheckpointSource | None = None
    if pretrained:
        if ckpt_path is None and spec.hf_repo is None:
            raise ValueError(
                f"{variant} has no published weights, so pretrained=True needs ckpt_path=<local checkpoint>; "
                "or set pretrained=False"
            )
        source = CheckpointSource(variant, None if ckpt_path is None else str(ckpt_path), spec.hf_repo,
                                  spec.hf_filename, tuple(ckpt_bands))
    elif ckpt_path is not None:
        warnings.warn(
            f"{variant}: ckpt_path={ckpt_path!r} is ignored because pretrained=False; set pretrained=True to load it",
            UserWarning,
            stacklevel=2,
        )

    device = torch.empty(()).device  # honours an enclosing `with torch.device(...)`
    path = None
    if source is not None and device.type != "meta":
        path = source.resolve()  # a missing file fails here, before any memory is allocated
    # With weights to load, build shape-only and materialise once: the random init would be overwritten anyway.
    with torch.device("meta") if path is not None else contextlib.nullcontext():
        encoder = PrithviViT(
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            patch_size=spec.patch_size if patch_size is None else patch_size,
            bands=model_bands,
            img_size=img_size,
            num_frames=num_frames,
            mlp_ratio=spec.mlp_ratio,
            coords_encoding=coords,
            coords_scale_learn=scale_learn,
            drop_path_rate=float(rate),
            out_indices=out_indices,
            variant=variant,
        )
    encoder.coords_added = bool(set(coords) - set(spec.coords))
    if source is not None and path is not None:
        encoder.to_empty(device=device)
        load_checkpoint_into(encoder, source, path)
    elif source is not None:
        encoder.pending_checkpoint = source  # meta build: load_pretrained() loads it after materialisation
    return encoder


for _name, _spec in VARIANTS.items():
    # accepted_args: build_prithvi takes **unsupported only to refuse it by name; the recipe check reads this list
    # not_implemented: TerraTorch options of these backbones that are refused with that reason, not a did-you-mean
    BACKBONE_REGISTRY.register(functools.partial(build_prithvi, _name), name=_name, accepted_args=_KWARGS,
                               not_implemented=("vit_adapter", "vpt"), **_spec.metadata())
