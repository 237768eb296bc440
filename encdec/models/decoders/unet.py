"""UNetDecoder: TerraTorch's UNetDecoder (smp >= 0.5's ``UnetDecoder`` fed the first level twice).

Block ``i`` upsamples the running map (nearest) to the size of the next shallower feature, concatenates it and
applies two conv + norm + ReLU; the last block has no skip and upsamples to the size of ``features[0]``. For a
pyramid ``[(64, 224²), (128, 112²), (256, 56²), (512, 28²)]`` and ``channels=[256, 128, 64, 32]`` the output is
``[B, 32, 224, 224]``.

The modules sit where TerraTorch's do (``decoder.blocks.<i>.conv1.0`` conv, ``.1`` norm), so a TerraTorch
checkpoint's ``decoder.decoder.blocks...`` keys load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encdec.models.decoders._blocks import check_feature_maps, check_norm
from encdec.models.norms import conv_bias, make_norm2d
from encdec.registry import DECODER_REGISTRY

__all__ = ["UNetDecoder"]

# TerraTorch's ``use_batchnorm`` values (smp's ``use_norm``) that have an equivalent here
_SMP_NORMS: dict[Any, str] = {True: "batch", "batchnorm": "batch", False: "none", "identity": "none"}


def _conv_norm_relu(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """smp's ``Conv2dReLU``: 3x3 conv (bias only without a norm), norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=conv_bias(norm)),
        make_norm2d(norm, out_channels),
        nn.ReLU(),
    )


class _UpBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv_norm_relu(in_channels + skip_channels, out_channels, norm)
        self.conv2 = _conv_norm_relu(out_channels, out_channels, norm)

    def forward(self, x: Tensor, size: tuple[int, int], skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class _Blocks(nn.Module):
    """Holds ``blocks`` one level down, as smp's UnetDecoder inside TerraTorch's wrapper (``decoder.blocks``)."""

    def __init__(self, blocks: list[_UpBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


@DECODER_REGISTRY.register(input="maps", levels="pyramid", upsamples=True)
class UNetDecoder(nn.Module):
    """UNet decoder over a pyramid whose levels halve in size, deepest last (see the module docstring).

    Args:
        channel_list: channels of the incoming features, shallowest first.
        channels: output channels of each block, one per feature (deepest block first).
        norm: norm of every conv (``encdec.models.norms``); default ``batch`` as TerraTorch.
        use_batchnorm: TerraTorch's name for the norm: ``True``/``"batchnorm"`` (batch) or
            ``False``/``"identity"`` (none); overrides ``norm`` when given.
        attention_type: TerraTorch/smp's optional attention; only ``None`` is supported here.
    """

    def __init__(
        self,
        channel_list: Sequence[int],
        channels: Sequence[int],
        norm: str = "batch",
        use_batchnorm: bool | str | None = None,
        attention_type: str | None = None,
    ) -> None:
        super().__init__()
        channel_list = list(channel_list)
        if isinstance(channels, int) or not all(isinstance(c, int) and c > 0 for c in channels):
            raise TypeError(f"UNetDecoder: channels must be a list of positive ints (one per block), got {channels!r}")
        channels = list(channels)
        if len(channels) != len(channel_list) or not channels:
            raise ValueError(
                f"UNetDecoder: channels has {len(channels)} entries but there are {len(channel_list)} input features "
                f"(channel_list={channel_list}); give one block width per feature, e.g. "
                f"{[max(16, c // 2) for c in reversed(channel_list)]}"
            )
        if use_batchnorm is not None:
            if not isinstance(use_batchnorm, (bool, str)) or use_batchnorm not in _SMP_NORMS:
                raise ValueError(
                    f"UNetDecoder: use_batchnorm={use_batchnorm!r} is not supported; use True / 'batchnorm', "
                    "False / 'identity', or choose the norm with norm= (batch, group, layer, frozen_batch, none)"
                )
            norm = _SMP_NORMS[use_batchnorm]
        if attention_type is not None:
            raise ValueError(
                f"UNetDecoder: attention_type={attention_type!r} is not supported (only None); remove it, or use "
                "the smp decoder 'smp_Unet' with decoder_attention_type"
            )
        self.norm = check_norm(norm, "UNetDecoder")
        self.channel_list = channel_list
        in_chs = [channel_list[-1], *channels[:-1]]
        skip_chs = [*reversed(channel_list[:-1]), 0]
        self.decoder = _Blocks(
            [_UpBlock(i, s, o, norm) for i, s, o in zip(in_chs, skip_chs, channels, strict=True)]
        )
        self.out_channels: int = channels[-1]

    def forward(self, features: list[Tensor]) -> Tensor:
        check_feature_maps(features, "UNetDecoder")
        if len(features) != len(self.channel_list):
            raise ValueError(f"UNetDecoder was built for {len(self.channel_list)} features but received {len(features)}")
        skips: list[Tensor | None] = [*reversed(features[:-1]), None]
        # target sizes: each shallower level in turn, then the first level again (smp fed it twice)
        sizes = [tuple(f.shape[-2:]) for f in reversed(features[:-1])] + [tuple(features[0].shape[-2:])]
        x = features[-1]
        for block, size, skip in zip(self.decoder.blocks, sizes, skips, strict=True):
            x = block(x, (int(size[0]), int(size[1])), skip)
        return x
