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
    "AuxiliaryHead",
    "AuxiliaryHeadModule",
    "ModelOutput",
    "NeckSequence",
    "PixelWiseModel",
    "ScalarOutputModel",
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


def _patch_hw(encoder: nn.Module) -> tuple[int, int] | None:
    """The encoder's spatial patch size, read from ``patch_size`` (int, (h, w) or (t, h, w))."""
    ps = getattr(encoder, "patch_size", None)
    if ps is None:
        return None
    if isinstance(ps, int):
        return (ps, ps)
    ps = tuple(int(p) for p in ps)
    return (ps[-2], ps[-1])


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
    ) -> None:
        super().__init__()
        self.task = task
        self.encoder = encoder
        self.neck = neck if neck is not None else NeckSequence()
        self.decoder = decoder
        self.head = head if head is not None else nn.Identity()
        self.aux_heads = nn.ModuleDict(aux_heads or {})
        self.rescale = rescale

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Reflect-pad H/W up to a multiple of the encoder's patch size (5D inputs pad the last two dims)."""
        h, w = x.shape[-2:]
        patch = _patch_hw(self.encoder)
        if patch is None:
            return x, (h, w)
        ph, pw = (-h) % patch[0], (-w) % patch[1]
        if ph == 0 and pw == 0:
            return x, (h, w)
        # reflect padding needs pad < dim; fall back to replicate for tiny inputs
        mode = "reflect" if (ph < h and pw < w) else "replicate"
        if x.dim() == 5:
            b, c, t = x.shape[:3]
            flat = x.reshape(b, c * t, h, w)
            return F.pad(flat, (0, pw, 0, ph), mode=mode).reshape(b, c, t, h + ph, w + pw), (h, w)
        return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)

    def features(self, x: Tensor, **encoder_kwargs: Any) -> tuple[list[Tensor], tuple[int, int]]:
        """Encoder + necks. Returns the necked features and the (padded) image size they came from."""
        x, _ = self._pad(x)
        feats = self.encoder(x, **encoder_kwargs)
        padded_hw = (int(x.shape[-2]), int(x.shape[-1]))
        return self.neck(list(feats), image_size=padded_hw), padded_hw

    def sharding_units(self) -> list[nn.Module]:
        """Modules to wrap individually when sharding (FSDP) or checkpointing: each encoder block, then
        the decoder. The root is wrapped last by the strategy."""
        units: list[nn.Module] = list(getattr(self.encoder, "blocks", []) or [])
        units.append(self.decoder)
        return units


class PixelWiseModel(_EncoderDecoderModel):
    """Segmentation / pixel-wise regression model.

    Inputs whose H/W are not a multiple of the encoder's ``patch_size`` are reflect-padded before the
    encoder; with ``rescale=True`` outputs are bilinearly interpolated to the padded size and cropped back
    to the input's H x W. Segmentation gives ``[B, C, H, W]``; regression with one output ``[B, H, W]``.
    """

    def _finish(self, out: Tensor, padded_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
        if self.rescale and tuple(out.shape[-2:]) != padded_hw:
            out = F.interpolate(out, size=padded_hw, mode="bilinear", align_corners=False)
        if tuple(out.shape[-2:]) == padded_hw and padded_hw != hw:
            out = out[..., : hw[0], : hw[1]]
        if self.task == "regression" and out.dim() == 4 and out.shape[1] == 1:
            out = out[:, 0]
        return out

    def forward(self, x: Tensor, **encoder_kwargs: Any) -> ModelOutput:
        hw = (int(x.shape[-2]), int(x.shape[-1]))
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


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

