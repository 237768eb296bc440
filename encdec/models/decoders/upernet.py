"""UperNetDecoder: pyramid pooling on the deepest level, FPN laterals, all levels fused at level 0
(MMSegmentation's UPerHead, as TerraTorch adapts it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encdec.config.checks import check_int
from encdec.models.decoders._blocks import ConvModule, check_feature_maps, check_norm, learned_pyramid
from encdec.registry import DECODER_REGISTRY

__all__ = ["PPM", "UperNetDecoder"]


class PPM(nn.ModuleList):
    """Pyramid pooling module: adaptive average pools at ``pool_scales``, each 1x1 ConvModule, upsampled back.

    Args:
        pool_scales: output sizes of the adaptive pools.
        in_channels: channels of the pooled feature.
        channels: channels of each branch.
        align_corners: passed to the bilinear upsampling.
        norm: norm of each branch.
    """

    def __init__(
        self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool, norm: str = "batch"
    ) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1, norm=norm)) for s in pool_scales
        )
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        size = x.shape[2:]
        return [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=self.align_corners) for branch in self]


@DECODER_REGISTRY.register(input="maps", levels="pyramid", upsamples=False)
class UperNetDecoder(nn.Module):
    """UperNet: PPM on the last (deepest) feature, 1x1 lateral convs on the others, a top-down FPN path,
    3x3 convs, then everything upsampled to level 0's size, concatenated and fused by a 3x3 ConvModule.

    The output has ``channels`` channels at the size of ``features[0]`` (after the scale modules, if any).

    Args:
        channel_list: channels of the incoming features, shallowest (largest) first.
        pool_scales: PPM pool sizes.
        channels: channels inside the decoder and of its output (``out_channels``).
        align_corners: for every bilinear upsampling.
        scale_modules: first turn four same-size ViT maps into a x4/x2/x1/x0.5 pyramid with learned layers
            (as the ``LearnedInterpolateToPyramidal`` neck; TerraTorch's deprecated option). Needs 4 features.
        norm: norm of every ConvModule (``encdec.models.norms``).
    """

    def __init__(
        self,
        channel_list: Sequence[int],
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        channels: int = 256,
        align_corners: bool = True,
        scale_modules: bool = False,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        channel_list = list(channel_list)
        if not channel_list:
            raise ValueError("UperNetDecoder: channel_list is empty; it needs at least one feature")
        check_int(channels, "UperNetDecoder: channels")
        scales = list(pool_scales) if isinstance(pool_scales, Sequence) else None
        if not scales:
            raise ValueError(f"UperNetDecoder: pool_scales must be a non-empty list of ints >= 1, got {pool_scales!r}")
        for i, s in enumerate(scales):
            check_int(s, f"UperNetDecoder: pool_scales[{i}]", fix="pooled grid sizes such as [1, 2, 3, 6]")
        self.norm = check_norm(norm, "UperNetDecoder")
        self.scale_modules = bool(scale_modules)
        if self.scale_modules:
            if len(channel_list) != 4:
                raise ValueError(
                    f"UperNetDecoder: scale_modules=True needs exactly 4 features, got {len(channel_list)} "
                    f"(channel_list={channel_list}); select four with a SelectIndices neck"
                )
            # attribute names fpn1..fpn4 as TerraTorch, so its decoder state-dict keys carry over
            self.fpn1, self.fpn2, self.fpn3, self.fpn4 = learned_pyramid(channel_list, norm)
            channel_list = [channel_list[0] // 4, channel_list[1] // 2, channel_list[2], channel_list[3]]
        self.channel_list = channel_list
        self.channels = channels
        self.align_corners = align_corners
        self.psp_modules = PPM(scales, channel_list[-1], channels, align_corners, norm)
        self.bottleneck = ConvModule(channel_list[-1] + len(scales) * channels, channels, 3, padding=1, norm=norm)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, norm=norm) for c in channel_list[:-1])
        self.fpn_convs = nn.ModuleList(
            ConvModule(channels, channels, 3, padding=1, norm=norm) for _ in channel_list[:-1]
        )
        self.fpn_bottleneck = ConvModule(len(channel_list) * channels, channels, 3, padding=1, norm=norm)
        self.out_channels: int = channels

    def _up(self, x: Tensor, size: torch.Size) -> Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, features: list[Tensor]) -> Tensor:
        check_feature_maps(features, "UperNetDecoder")
        if self.scale_modules:
            if len(features) != 4:
                raise ValueError(f"UperNetDecoder(scale_modules=True) needs 4 features, received {len(features)}")
            features = [self.fpn1(features[0]), self.fpn2(features[1]), self.fpn3(features[2]), self.fpn4(features[3])]
        if len(features) != len(self.channel_list):
            raise ValueError(
                f"UperNetDecoder was built for {len(self.channel_list)} features but received {len(features)}"
            )
        deepest = features[-1]
        laterals = [conv(features[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.bottleneck(torch.cat([deepest, *self.psp_modules(deepest)], dim=1)))
        # top-down: each level receives the (already enriched) level above it
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + self._up(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [self._up(o, size) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))
