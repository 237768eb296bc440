"""UNetDecoder: upsample the deepest feature level by level, concatenating each shallower one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encdec.models.decoders._blocks import ConvModule, check_feature_maps, check_norm
from encdec.registry import DECODER_REGISTRY

__all__ = ["UNetDecoder"]


class _UpBlock(nn.Module):
    """Upsample (nearest) to the skip's size (or x2 without a skip), concatenate the skip, two 3x3 ConvModules."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = ConvModule(in_channels + skip_channels, out_channels, 3, padding=1, norm=norm)
        self.conv2 = ConvModule(out_channels, out_channels, 3, padding=1, norm=norm)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        if skip is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = torch.cat([F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip], dim=1)
        return self.conv2(self.conv1(x))


@DECODER_REGISTRY.register(input="maps", levels="pyramid", upsamples=True)
class UNetDecoder(nn.Module):
    """UNet decoder over a pyramid whose levels halve in size, deepest last.

    Block ``i`` upsamples the running map and concatenates feature ``n-2-i``; the last block has no skip and
    just doubles the size, so the output is twice the size of ``features[0]`` with ``channels[-1]`` channels
    (TerraTorch's UNetDecoder, which feeds smp's UnetDecoder the first level twice, has the same layout).

    Args:
        channel_list: channels of the incoming features, shallowest first.
        channels: output channels of each block, one per feature (deepest block first).
        norm: norm of every conv (``encdec.models.norms``).
    """

    def __init__(self, channel_list: Sequence[int], channels: Sequence[int], norm: str = "batch") -> None:
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
        self.norm = check_norm(norm, "UNetDecoder")
        self.channel_list = channel_list
        in_chs = [channel_list[-1], *channels[:-1]]
        skip_chs = [*reversed(channel_list[:-1]), 0]
        self.blocks = nn.ModuleList(
            _UpBlock(i, s, o, norm) for i, s, o in zip(in_chs, skip_chs, channels, strict=True)
        )
        self.out_channels: int = channels[-1]

    def forward(self, features: list[Tensor]) -> Tensor:
        check_feature_maps(features, "UNetDecoder")
        if len(features) != len(self.channel_list):
            raise ValueError(f"UNetDecoder was built for {len(self.channel_list)} features but received {len(features)}")
        skips: list[Tensor | None] = [*reversed(features[:-1]), None]
        x = features[-1]
        for block, skip in zip(self.blocks, skips, strict=True):
            x = block(x, skip)
        return x
