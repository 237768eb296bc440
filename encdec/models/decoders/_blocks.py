"""Building blocks shared by the built-in necks and decoders: conv + norm + activation, the ViT rescaling
pyramid, and input checks that turn a shape mistake into a message naming the neck to add."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from encdec.config.checks import check_int
from encdec.models.norms import NORMS, conv_bias, make_norm2d

__all__ = ["ConvModule", "check_feature_maps", "check_index", "check_norm", "learned_pyramid"]


def check_norm(norm: str, owner: str) -> str:
    """Validate a ``norm`` argument early, naming the component that received it."""
    if norm not in NORMS:
        raise ValueError(f"{owner}: norm={norm!r} is not supported; use one of {', '.join(NORMS)}")
    return norm


def check_index(index: int, channel_list: Sequence[int], owner: str, arg: str) -> int:
    """Validate an index into the feature list (negative allowed), naming the argument and the list length."""
    n = len(channel_list)
    check_int(index, f"{owner}: {arg}", minimum=None, error=TypeError)
    if not -n <= index < n:
        raise ValueError(
            f"{owner}: {arg}={index} is out of range for {n} input features (channel_list={list(channel_list)}); "
            f"use an index in {-n}..{n - 1}"
        )
    return index


def check_feature_maps(features: Sequence[Tensor], owner: str, indices: Sequence[int] | None = None) -> None:
    """Raise a clear error when a feature the component reads is not a ``[B, C, H, W]`` map.

    ViT encoders return ``[B, 1+N, D]`` tokens; the usual fix is a ``ReshapeTokensToImage`` neck.
    """
    if isinstance(features, Tensor):
        raise TypeError(f"{owner} takes a list of feature maps, got a single tensor of shape {tuple(features.shape)}")
    picks = range(len(features)) if indices is None else indices
    for i in picks:
        x = features[i]
        if x.dim() != 4:
            hint = (
                " These look like ViT tokens [B, tokens, D]: add the neck {'name': 'ReshapeTokensToImage'} first."
                if x.dim() == 3
                else ""
            )
            raise ValueError(
                f"{owner} expects [B, C, H, W] feature maps, but feature {i} has shape {tuple(x.shape)}.{hint}"
            )


class ConvModule(nn.Module):
    """Conv2d -> norm -> activation (MMSegmentation's ConvModule, with the norm chosen by name).

    Submodules are named ``conv``, ``norm``, ``act`` as in TerraTorch's ConvModule, so decoder state-dict keys
    (``decoder.bottleneck.conv.weight``...) match TerraTorch's with the default batch norm. The conv has a
    bias only where ``encdec.models.norms.conv_bias`` says so (no norm, or a frozen one), as TerraTorch's has none.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        norm: str = "batch",
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=conv_bias(norm))
        self.norm = make_norm2d(norm, out_channels)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


def learned_pyramid(channel_list: Sequence[int], norm: str = "batch") -> list[nn.Module]:
    """Four modules turning four same-size ViT maps into a x4 / x2 / x1 / x0.5 pyramid.

    ``fpn1``: ConvT(c0 -> c0/2) -> norm -> GELU -> ConvT(c0/2 -> c0/4) (x4), ``fpn2``: ConvT(c1 -> c1/2) (x2),
    ``fpn3``: identity, ``fpn4``: 2x2 max-pool. Output channels ``[c0//4, c1//2, c2, c3]``. Shared by the
    ``LearnedInterpolateToPyramidal`` neck and ``UperNetDecoder(scale_modules=True)``; both keep TerraTorch's
    attribute names ``fpn1..fpn4``. The first transposed conv keeps its bias in front of the norm, as TerraTorch's
    does, so its checkpoints' ``fpn1.0.bias`` loads.
    """
    c0, c1 = int(channel_list[0]), int(channel_list[1])
    if c0 < 4 or c1 < 2:
        raise ValueError(
            f"the learned ViT pyramid needs channel_list[0] >= 4 and channel_list[1] >= 2 (it divides them by 4 and 2), "
            f"got {list(channel_list)}"
        )
    fpn1 = nn.Sequential(
        nn.ConvTranspose2d(c0, c0 // 2, 2, 2),
        make_norm2d(norm, c0 // 2),
        nn.GELU(),
        nn.ConvTranspose2d(c0 // 2, c0 // 4, 2, 2),
    )
    fpn2 = nn.Sequential(nn.ConvTranspose2d(c1, c1 // 2, 2, 2))
    fpn3 = nn.Sequential(nn.Identity())
    fpn4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))
    return [fpn1, fpn2, fpn3, fpn4]
