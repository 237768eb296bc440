"""LinearDecoder: one transposed conv from a feature map straight to class logits (it includes its head)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from encdec.config.checks import check_int
from encdec.models.decoders._blocks import check_feature_maps, check_index
from encdec.registry import DECODER_REGISTRY

__all__ = ["LinearDecoder"]


@DECODER_REGISTRY.register(includes_head=True, input="maps", levels="one", upsamples=True)
class LinearDecoder(nn.Module):
    """A ConvT with kernel = stride = ``upsampling_size`` from ``features[in_index]`` to ``num_classes``.

    It is its own head (``includes_head = True``): the factory passes ``num_classes`` to it and adds no head,
    whether the decoder is named in the registry or given as a module.

    Args:
        channel_list: channels of the incoming features.
        num_classes: output channels (classes, or outputs for regression).
        upsampling_size: upsampling factor; 16 takes a patch-16 ViT grid back to pixels (TerraTorch has no
            default; 14 for patch-14 encoders).
        in_index: which feature to decode.
    """

    includes_head: bool = True

    def __init__(
        self,
        channel_list: Sequence[int],
        num_classes: int,
        upsampling_size: int = 16,
        in_index: int = -1,
    ) -> None:
        super().__init__()
        check_int(num_classes, "LinearDecoder: num_classes")
        check_int(upsampling_size, "LinearDecoder: upsampling_size", fix="the patch size the tokens came from, e.g. 16")
        self.channel_list = list(channel_list)
        self.in_index = check_index(in_index, self.channel_list, "LinearDecoder", "in_index")
        self.num_classes = num_classes
        self.upsampling_size = upsampling_size
        self.conv = nn.ConvTranspose2d(
            self.channel_list[in_index], num_classes, kernel_size=upsampling_size, stride=upsampling_size
        )
        self.out_channels: int = num_classes

    def forward(self, features: list[Tensor]) -> Tensor:
        check_feature_maps(features, "LinearDecoder", [self.in_index])
        return self.conv(features[self.in_index])
