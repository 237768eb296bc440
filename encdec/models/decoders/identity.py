"""IdentityDecoder: hand one feature straight to the head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from encdec.models.decoders._blocks import check_index
from encdec.registry import DECODER_REGISTRY

__all__ = ["IdentityDecoder"]


@DECODER_REGISTRY.register(input="any", levels="one", upsamples=False)
class IdentityDecoder(nn.Module):
    """Return ``features[out_index]`` unchanged (maps, tokens or pooled vectors).

    Typical uses: classification after an ``AggregateTokens`` neck, or a head that does its own upsampling.

    Args:
        channel_list: channels of the incoming features.
        out_index: which feature to return; ``out_channels`` is its channel count.
    """

    def __init__(self, channel_list: Sequence[int], out_index: int = -1) -> None:
        super().__init__()
        self.channel_list = list(channel_list)
        self.out_index = check_index(out_index, self.channel_list, "IdentityDecoder", "out_index")
        self.out_channels: int = int(self.channel_list[out_index])

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.channel_list):
            raise ValueError(
                f"IdentityDecoder was built for {len(self.channel_list)} features but received {len(features)}"
            )
        return features[self.out_index]
