"""segmentation_models_pytorch decoders as a lazy source of DECODER_REGISTRY (``smp_Unet``, ``smp_FPN``...).

smp builds a decoder inside a whole segmentation model from an encoder's channel list. We let smp do exactly
that (so its own defaults and argument names apply, given as ``decoder_<smp arg>``) with a parameter-free
stand-in encoder that only reports our channel list, and keep the decoder. smp treats the feature list as its
encoder's output: entry 0 is assumed to be at input resolution and some decoders expect the last two entries at
different scales (add the ``AddBottleneckLayer`` neck for those).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from encdec.registry import DECODER_REGISTRY

# Decoders whose smp model needs encoder facts we cannot supply from a channel list.
_UNSUPPORTED = {"DPT": "it needs the encoder's output strides and prefix-token layout"}


class _ChannelsOnlyEncoder(nn.Module):
    """Stands in for an smp encoder while smp builds a decoder: reports channels, has no parameters."""

    def __init__(self, out_channels: list[int], depth: int = 5, output_stride: int = 32, **_: Any) -> None:
        super().__init__()
        self._out_channels = list(out_channels)
        self._depth = depth
        self._output_stride = output_stride

    @property
    def out_channels(self) -> list[int]:
        return self._out_channels

    @property
    def output_stride(self) -> int:
        return self._output_stride

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        pass  # smp asks every encoder to adapt its stem; ours has none

    def make_dilated(self, output_stride: int) -> None:  # DeepLab asks; our features are what they are
        self._output_stride = output_stride


class ChannelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the channel dim of ``[B, C, H, W]`` maps (other inputs as ``nn.LayerNorm``).

    smp 0.6's ``decoder_use_norm="layernorm"`` puts a plain ``nn.LayerNorm(C)`` after its convs, which fails on
    channel-first maps ("expected input with shape [*, C]"). Same parameters and names, so keys are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


def _wants_layernorm(use_norm: Any) -> bool:
    kind = use_norm.get("type") if isinstance(use_norm, Mapping) else use_norm
    return kind == "layernorm"


def _channel_first_layernorms(module: nn.Module) -> None:
    """Swap every ``nn.LayerNorm`` inside ``module`` for a ``ChannelLayerNorm`` holding the same tensors."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                fixed = ChannelLayerNorm(child.normalized_shape, eps=child.eps,
                                         elementwise_affine=child.elementwise_affine, bias=child.bias is not None)
                fixed.load_state_dict(child.state_dict())
                setattr(parent, name, fixed)


class SmpDecoder(nn.Module):
    """An smp decoder on a feature list. ``out_channels`` is read from the head smp would have put after it."""

    def __init__(self, decoder: nn.Module, out_channels: int, smp_name: str) -> None:
        super().__init__()
        self.decoder = decoder
        self.out_channels = out_channels
        self.smp_name = smp_name

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.decoder(list(features))


def _register_stand_in(channels: list[int]) -> str:
    import segmentation_models_pytorch.encoders as smp_encoders

    # One entry per channel list: smp reads encoder params from its global table, not from call arguments.
    key = "encdec_channels_" + "_".join(str(c) for c in channels)
    if key not in smp_encoders.encoders:
        smp_encoders.encoders[key] = {
            "encoder": _ChannelsOnlyEncoder,
            "params": {"out_channels": list(channels)},
            "pretrained_settings": {},
        }
    return key


class SmpSource:
    """Lazy smp decoder source: importing encdec does not import smp."""

    def _models(self) -> dict[str, type]:
        import segmentation_models_pytorch as smp
        from segmentation_models_pytorch.base import SegmentationModel

        return {
            n: c
            for n, c in inspect.getmembers(smp, inspect.isclass)
            if issubclass(c, SegmentationModel) and c is not SegmentationModel
        }

    def names(self) -> list[str]:
        return sorted(n for n in self._models() if n not in _UNSUPPORTED)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._models()

    def __getitem__(self, name: str) -> type:
        return self._models()[name]

    def metadata(self, name: str) -> Mapping[str, Any]:
        return {"source": "smp", "includes_head": False}

    def build(self, name: str, channel_list: list[int], **kwargs: Any) -> SmpDecoder:
        if name in _UNSUPPORTED:
            raise ValueError(
                f"decoder 'smp_{name}' cannot be built on a feature list: {_UNSUPPORTED[name]}; "
                "use another decoder (e.g. smp_Unet, smp_FPN, UperNetDecoder)"
            )
        channels = [int(c) for c in channel_list]
        if len(channels) < 2:
            raise ValueError(
                f"decoder 'smp_{name}' needs at least 2 features (smp treats entry 0 as the input-resolution stage); "
                f"got channel list {channels}. Add necks that produce a pyramid (e.g. LearnedInterpolateToPyramidal)"
            )
        model_cls = self._models()[name]
        accepted = set(inspect.signature(model_cls).parameters)
        unknown = sorted(k for k in kwargs if k not in accepted)
        if unknown:
            allowed = sorted(a for a in accepted if a.startswith("decoder_") or a in ("upsampling",))
            raise TypeError(
                f"decoder 'smp_{name}' got unexpected arguments {unknown}; smp's {name} accepts {allowed} "
                "(pass them as decoder_<name>, e.g. decoder_decoder_channels)"
            )
        depth = len(channels) - 1
        default_dec = inspect.signature(model_cls).parameters.get("decoder_channels")
        if (
            "decoder_channels" not in kwargs
            and default_dec is not None
            and isinstance(default_dec.default, (list, tuple))
            and len(default_dec.default) > depth
        ):
            # smp's default has one entry per stage of a 5-stage encoder; keep the first `depth` of them
            kwargs["decoder_channels"] = list(default_dec.default)[:depth]
        model = model_cls(
            encoder_name=_register_stand_in(channels),
            encoder_weights=None,
            encoder_depth=depth,
            in_channels=channels[0],
            classes=1,
            **kwargs,
        ) if "encoder_depth" in accepted else model_cls(
            encoder_name=_register_stand_in(channels), encoder_weights=None, in_channels=channels[0], classes=1, **kwargs
        )
        if _wants_layernorm(kwargs.get("decoder_use_norm")):
            _channel_first_layernorms(model.decoder)
        head = model.segmentation_head
        first = next(m for m in head.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        out_channels = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
        return SmpDecoder(model.decoder, int(out_channels), name)


SMP_SOURCE = SmpSource()
DECODER_REGISTRY.register_source("smp", SMP_SOURCE)
