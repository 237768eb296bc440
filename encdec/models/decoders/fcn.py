"""FCNDecoder: a stack of x2 upsampling blocks on one feature (TerraTorch's default decoder)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from encdec.config.checks import check_int
from encdec.models.decoders._blocks import check_feature_maps, check_index, check_norm
from encdec.models.norms import conv_bias, make_norm2d
from encdec.registry import DECODER_REGISTRY

__all__ = ["FCNDecoder"]


def _upscale_block(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """ConvT(k2, s2) -> Conv3x3 -> norm -> GELU: doubles H and W.

    TerraTorch's block has a bias on the 3x3 conv before its LayerNorm; kept with ``layer`` so the keys match.
    """
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=norm == "layer" or conv_bias(norm)),
        make_norm2d(norm, out_channels),
        nn.GELU(),
    )


@DECODER_REGISTRY.register(input="maps", levels="one", upsamples=True)
class FCNDecoder(nn.Module):
    """Fully convolutional decoder: ``num_convs`` upscale blocks on ``features[in_index]``.

    Each block is ConvT(k2, s2) -> Conv3x3 -> norm -> GELU, so the output is ``2**num_convs`` times the
    input feature's size (x16 by default: a ViT patch-16 grid back to pixels).

    Args:
        channel_list: channels of the incoming features.
        channels: channels of every block (``out_channels``).
        num_convs: number of upscale blocks (>= 1).
        in_index: which feature to decode.
        norm: norm in each block (``encdec.models.norms``). The default ``"layer"`` is TerraTorch's (a channel
            LayerNorm, eps 1e-6, the 3x3 conv with a bias), so TerraTorch checkpoints load unchanged.
    """

    def __init__(
        self,
        channel_list: Sequence[int],
        channels: int = 256,
        num_convs: int = 4,
        in_index: int = -1,
        norm: str = "layer",
    ) -> None:
        super().__init__()
        check_int(num_convs, "FCNDecoder: num_convs")
        check_int(channels, "FCNDecoder: channels")
        self.channel_list = list(channel_list)
        self.in_index = check_index(in_index, self.channel_list, "FCNDecoder", "in_index")
        self.norm = check_norm(norm, "FCNDecoder")
        self.channels = channels
        self.num_convs = num_convs
        in_ch = self.channel_list[in_index]
        blocks = []
        for _ in range(num_convs):
            blocks.append(_upscale_block(in_ch, channels, norm))
            in_ch = channels
        self.convs = nn.Sequential(*blocks)
        self.out_channels: int = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        check_feature_maps(features, "FCNDecoder", [self.in_index])
        return self.convs(features[self.in_index])
