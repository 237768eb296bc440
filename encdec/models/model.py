"""The composed models the factory returns: encoder -> necks -> decoder -> head (+ auxiliary heads).

Attribute names (``encoder``, ``neck``, ``decoder``, ``head``, ``aux_heads``) match TerraTorch's
PixelWiseModel/ScalarOutputModel so state-dict keys start the same way (``encoder.``, ``decoder.``, ``head.``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PADDING_MODES",
    "AuxiliaryHead",
    "AuxiliaryHeadModule",
    "ModelOutput",
    "NeckSequence",
    "PixelWiseModel",
    "ScalarOutputModel",
    "center_crop",
    "pad_to_patches",
    "recomputed_state_keys",
]


@dataclass
class ModelOutput:
    """What every factory model returns: the task output and one tensor per auxiliary head."""

    output: Tensor
    auxiliary_heads: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class AuxiliaryHead:
    """An extra decoder (+ its own head) on the same necked features (TerraTorch's call shape).

    Args:
        name: key of its output in ``ModelOutput.auxiliary_heads``.
        decoder: decoder registry name (or an ``nn.Module``).
        decoder_args: ``decoder_*`` keys go to the decoder, ``head_*`` keys to this head's own head;
            unprefixed keys go to the decoder.
    """

    name: str
    decoder: str | nn.Module
    decoder_args: dict[str, Any] | None = None


class NeckSequence(nn.ModuleList):
    """Necks applied in order. Each neck's forward takes ``(features, image_size=None)``."""

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:  # type: ignore[override]
        for neck in self:
            features = neck(features, image_size=image_size)
        return features


class AuxiliaryHeadModule(nn.Module):
    """A decoder and (unless the decoder includes one) a head, for one auxiliary output."""

    def __init__(self, decoder: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.decoder = decoder
        self.head = head if head is not None else nn.Identity()

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.head(self.decoder(list(features)))


def _patch_thw(encoder: nn.Module) -> tuple[int, int, int] | None:
    """The patch size used for padding, found as TerraTorch finds it: the first module (the encoder itself, then
    its submodules in order) with a ``patch_size`` attribute; an int or (h, w) has a temporal size of 1."""
    raw: Any = next((m.patch_size for m in encoder.modules() if hasattr(m, "patch_size")), None)
    if raw is None or raw == 0:
        return None
    if isinstance(raw, int):
        return (1, raw, raw)
    ps = [int(p) for p in raw]
    if len(ps) == 1:
        return (1, ps[0], ps[0])
    if len(ps) == 2:
        return (1, ps[0], ps[1])
    if len(ps) == 3:
        return (ps[0], ps[1], ps[2])
    raise ValueError(f"the encoder's patch_size {raw!r} is not an int or a list of 1, 2 or 3 ints")


def pad_to_patches(x: Tensor, patch: tuple[int, int, int], mode: str) -> Tensor:
    """TerraTorch 1.2's ``pad_images``: pad H and W to a multiple of twice the patch size (so the patch grid is
    even, which most decoders need), split evenly between both sides with the extra pixel at the end; pad T of a
    ``[B, C, T, H, W]`` input at the end to a multiple of the temporal patch size.

    Reflect padding needs a pad smaller than the dimension; tiny inputs (where TerraTorch fails) are padded by
    replication instead.
    """
    if x.dim() < 4:
        return x
    pt, ph, pw = patch[0], patch[1] * 2, patch[2] * 2
    if pt > 1 and x.dim() < 5:
        raise ValueError(
            f"the encoder's temporal patch size is {pt} but the input {tuple(x.shape)} has no time axis; pass "
            "[B, C, T, H, W]"
        )
    h, w = int(x.shape[-2]), int(x.shape[-1])
    t = int(x.shape[-3]) if x.dim() > 4 else 1
    t_pad, h_pad, w_pad = (-t) % pt, (-h) % ph, (-w) % pw
    if not (t_pad or h_pad or w_pad):
        return x
    pads = [w_pad // 2, w_pad - w_pad // 2, h_pad // 2, h_pad - h_pad // 2]
    if t_pad:
        pads += [0, t_pad]
    if mode == "reflect" and any(p >= d for p, d in zip(pads, (w, w, h, h, t, t))):
        mode = "replicate"
    if x.dim() == 5 and not t_pad and mode in ("reflect", "replicate", "circular"):
        b, c = x.shape[:2]  # pad H, W of every frame: fold T into channels for the 2-D pad
        return F.pad(x.reshape(b, c * t, h, w), pads, mode=mode).reshape(b, c, t, h + h_pad, w + w_pad)
    return F.pad(x, pads, mode=mode)


def center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TerraTorch's ``center_crop``: the centred ``size`` window (offsets floor((have - want) / 2), at least 0)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    top, left = max((h - size[0]) // 2, 0), max((w - size[1]) // 2, 0)
    return x[..., top : top + size[0], left : left + size[1]]


class _EncoderDecoderModel(nn.Module):
    """Shared plumbing: padding to the patch size, encoder kwargs, necks, aux heads."""

    def __init__(
        self,
        task: str,
        encoder: nn.Module,
        decoder: nn.Module,
        head: nn.Module | None,
        neck: NeckSequence | None = None,
        aux_heads: dict[str, AuxiliaryHeadModule] | None = None,
        rescale: bool = True,
        padding: str | None = "reflect",
        image_size_out: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if padding not in PADDING_MODES:
            raise ValueError(
                f"padding {padding!r} is not a torch padding mode; use one of {list(PADDING_MODES)} "
                "(None: no padding, the input must then be a multiple of the patch size)"
            )
        self.task = task
        self.encoder = encoder
        self.neck = neck if neck is not None else NeckSequence()
        self.decoder = decoder
        self.head = head if head is not None else nn.Identity()
        self.aux_heads = nn.ModuleDict(aux_heads or {})
        self.rescale = rescale
        self.padding = padding
        self.image_size_out = None if image_size_out is None else (int(image_size_out[0]), int(image_size_out[1]))

    def _pad(self, x: Tensor) -> Tensor:
        patch = _patch_thw(self.encoder)
        if patch is None or self.padding is None:
            return x
        return pad_to_patches(x, patch, self.padding)

    def features(self, x: Tensor, **encoder_kwargs: Any) -> tuple[list[Tensor], tuple[int, int]]:
        """Encoder + necks. Returns the necked features and the (padded) image size they came from."""
        x = self._pad(x)
        feats = self.encoder(x, **encoder_kwargs)
        padded_hw = (int(x.shape[-2]), int(x.shape[-1]))
        if len(self.neck) == 0 and hasattr(self.encoder, "prepare_features_for_image_model"):
            # TerraTorch's pixel-wise and scalar models do this when no neck is given (pre-neck configs)
            prepare: Any = self.encoder.prepare_features_for_image_model
            return list(prepare(list(feats), image_size=padded_hw)), padded_hw
        return self.neck(list(feats), image_size=padded_hw), padded_hw

    def sharding_units(self) -> list[nn.Module]:
        """Modules to wrap individually when sharding (FSDP) or checkpointing: each encoder block, then
        the decoder. The root is wrapped last by the strategy."""
        units: list[nn.Module] = list(getattr(self.encoder, "blocks", []) or [])
        units.append(self.decoder)
        return units


class PixelWiseModel(_EncoderDecoderModel):
    """Segmentation / pixel-wise regression model, as TerraTorch 1.2's ``PixelWiseModel``.

    Inputs are padded (``pad_to_patches``, mode ``padding``) to a multiple of twice the encoder's patch size;
    with ``rescale=True`` outputs are bilinearly interpolated to the padded size; then they are centre-cropped
    to ``image_size_out`` (default: the input's H x W). A single output channel is squeezed: ``[B, H, W]``.
    """

    def _finish(self, out: Tensor, padded_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
        if self.rescale and tuple(out.shape[-2:]) != padded_hw:
            out = F.interpolate(out, size=padded_hw, mode="bilinear", align_corners=False)
        if out.dim() == 4 and out.shape[1] == 1:
            out = out[:, 0]
        return center_crop(out, hw)

    def forward(self, x: Tensor, **encoder_kwargs: Any) -> ModelOutput:
        hw = self.image_size_out or (int(x.shape[-2]), int(x.shape[-1]))
        feats, padded_hw = self.features(x, **encoder_kwargs)
        out = self._finish(self.head(self.decoder([f for f in feats])), padded_hw, hw)
        aux = {name: self._finish(m(feats), padded_hw, hw) for name, m in self.aux_heads.items()}
        return ModelOutput(out, aux)


class ScalarOutputModel(_EncoderDecoderModel):
    """Classification / scalar regression: ``[B, num_classes]`` (heads pool spatial or token dims)."""

    def forward(self, x: Tensor, **encoder_kwargs: Any) -> ModelOutput:
        feats, _ = self.features(x, **encoder_kwargs)
        out = self.head(self.decoder([f for f in feats]))
        aux = {name: m(feats) for name, m in self.aux_heads.items()}
        if self.task == "scalar_regression" and out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        return ModelOutput(out, aux)


PADDING_MODES = ("reflect", "replicate", "circular", "constant", None)


def recomputed_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model`` whose value is a fixed function of the architecture (Prithvi's ``pos_embed``):
    modules list them in ``recomputed_buffers`` and fill them in themselves when a state dict lacks them.

    Checkpoint readers that match keys before ``load_state_dict`` (DCP) skip these, so checkpoints written before
    they were stored still load. Names are as ``torch.distributed.checkpoint.state_dict`` gives them (no DDP
    ``module.`` or ``torch.compile`` ``_orig_mod.`` parts).
    """
    out = set()
    for name, module in model.named_modules():
        for buf in getattr(module, "recomputed_buffers", ()):
            key = f"{name}.{buf}" if name else buf
            key = key.replace("_orig_mod.", "")
            out.add(key[len("module."):] if key.startswith("module.") else key)
    return out


