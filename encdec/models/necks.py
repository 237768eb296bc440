"""Necks: the glue between an encoder's feature list and a decoder (TerraTorch's eight, same names and args).

Each neck is built as ``NECK_REGISTRY.build(name, channel_list, **kwargs)`` with the channel list it will
receive, reports the list it will hand on through ``process_channel_list``, and is called as
``neck(features, image_size=None)`` where ``image_size`` is the (padded) input's ``(H, W)``.

Deliberate differences from TerraTorch: arguments are validated at construction with errors naming the
neck, the argument and the allowed values; ``AggregateTokens.process_channel_list`` reports the channels it
really returns; no neck mutates the list it is given; ``ReshapeTokensToImage`` never silently changes its
own settings when a grid cannot be formed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from encdec.config.checks import check_int, is_number
from encdec.models.decoders._blocks import check_feature_maps, check_index, check_norm, learned_pyramid
from encdec.registry import NECK_REGISTRY

__all__ = [
    "AddBottleneckLayer",
    "AggregateTokens",
    "FeaturePyramidNetworkNeck",
    "InterpolateToPyramidal",
    "LearnedInterpolateToPyramidal",
    "MaxpoolToPyramidal",
    "Neck",
    "PermuteDims",
    "ReshapeTokensToImage",
    "SelectIndices",
]

_INTERP_MODES = ("nearest", "bilinear", "bicubic", "area", "nearest-exact")
_POOLINGS = ("mean", "max", "min", "cls")


def _as_channel_list(channel_list: Sequence[int], owner: str) -> list[int]:
    if isinstance(channel_list, int) or not all(isinstance(c, int) and c > 0 for c in channel_list):
        raise TypeError(f"{owner}: channel_list must be a list of positive ints (one per feature), got {channel_list!r}")
    if len(channel_list) == 0:
        raise ValueError(f"{owner}: channel_list is empty; the encoder (or previous neck) gives no features")
    return [int(c) for c in channel_list]


def _as_index_list(indices: int | Sequence[int], owner: str, arg: str) -> list[int]:
    if isinstance(indices, int) and not isinstance(indices, bool):
        return [indices]
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or len(indices) == 0:
        raise TypeError(f"{owner}: {arg} must be an int or a non-empty list of ints, got {indices!r}")
    return list(indices)


class Neck(nn.Module, ABC):
    """Base class: a module over the feature list that also reports how it changes the channel list.

    Args:
        channel_list: channels of each feature the neck will receive.
    """

    def __init__(self, channel_list: Sequence[int]) -> None:
        super().__init__()
        self.channel_list = _as_channel_list(channel_list, type(self).__name__)

    @abstractmethod
    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        """The channel list of the features ``forward`` returns, given those it receives."""

    @abstractmethod
    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        """Transform the feature list. ``image_size`` is the model input's (padded) ``(H, W)``."""


@NECK_REGISTRY.register
class SelectIndices(Neck):
    """Keep the features at ``indices`` (negative indices count from the end), in that order.

    Args:
        channel_list: channels of the incoming features.
        indices: positions to keep, e.g. ``[5, 11, 17, 23]`` for four of a 24-block ViT's outputs.
    """

    def __init__(self, channel_list: Sequence[int], indices: int | Sequence[int]) -> None:
        super().__init__(channel_list)
        picks = _as_index_list(indices, "SelectIndices", "indices")
        self.indices = [check_index(i, self.channel_list, "SelectIndices", "indices entry") for i in picks]

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        if len(features) != len(self.channel_list):
            raise ValueError(
                f"SelectIndices was built for {len(self.channel_list)} features but received {len(features)}"
            )
        return [features[i] for i in self.indices]

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return [channel_list[i] for i in self.indices]


@NECK_REGISTRY.register
class PermuteDims(Neck):
    """Permute the dimensions of every feature (``tensor.permute(*new_order)``).

    Args:
        channel_list: channels of the incoming features (unchanged).
        new_order: a permutation of ``range(ndim)``, e.g. ``[0, 3, 1, 2]`` for channels-last maps.
    """

    def __init__(self, channel_list: Sequence[int], new_order: Sequence[int]) -> None:
        super().__init__(channel_list)
        order = list(new_order) if isinstance(new_order, Sequence) and not isinstance(new_order, str) else None
        if order is None or sorted(order) != list(range(len(order))):
            raise ValueError(
                f"PermuteDims: new_order={new_order!r} is not a permutation of 0..ndim-1; "
                "give every dimension once, e.g. [0, 3, 1, 2]"
            )
        self.new_order = order

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        for i, x in enumerate(features):
            if x.dim() != len(self.new_order):
                raise ValueError(
                    f"PermuteDims: new_order={self.new_order} has {len(self.new_order)} dims but feature {i} "
                    f"has shape {tuple(x.shape)}"
                )
        return [x.permute(*self.new_order).contiguous() for x in features]

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return list(channel_list)


@NECK_REGISTRY.register
class InterpolateToPyramidal(Neck):
    """Upsample same-size maps into a pyramid: feature ``i`` of ``n`` is scaled by ``scale_factor**(n-i)``.

    Args:
        channel_list: channels of the incoming features (unchanged).
        scale_factor: growth between consecutive levels.
        mode: ``F.interpolate`` mode.
    """

    def __init__(self, channel_list: Sequence[int], scale_factor: int = 2, mode: str = "nearest") -> None:
        super().__init__(channel_list)
        if not is_number(scale_factor) or scale_factor <= 0:
            raise ValueError(f"InterpolateToPyramidal: scale_factor must be a positive number, got {scale_factor!r}")
        if mode not in _INTERP_MODES:
            raise ValueError(f"InterpolateToPyramidal: mode={mode!r} is not supported; use one of {_INTERP_MODES}")
        self.scale_factor = scale_factor
        self.mode = mode

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        check_feature_maps(features, "InterpolateToPyramidal")
        n = len(features)
        return [F.interpolate(x, scale_factor=self.scale_factor ** (n - i), mode=self.mode) for i, x in enumerate(features)]

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return list(channel_list)


@NECK_REGISTRY.register
class MaxpoolToPyramidal(Neck):
    """Downsample same-size maps into a pyramid: feature ``i`` is max-pooled with kernel ``kernel_size**i``.

    Args:
        channel_list: channels of the incoming features (unchanged).
        kernel_size: base kernel (and stride) of the pooling.
    """

    def __init__(self, channel_list: Sequence[int], kernel_size: int = 2) -> None:
        super().__init__(channel_list)
        self.kernel_size = check_int(kernel_size, "MaxpoolToPyramidal: kernel_size")

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        check_feature_maps(features, "MaxpoolToPyramidal")
        out = []
        for i, x in enumerate(features):
            k = self.kernel_size**i
            if k > 1 and min(x.shape[-2:]) < k:
                raise ValueError(
                    f"MaxpoolToPyramidal: feature {i} of size {tuple(x.shape[-2:])} is smaller than its pooling "
                    f"kernel {k} (kernel_size={self.kernel_size}**{i}); use fewer features or a larger input"
                )
            out.append(x if k == 1 else F.max_pool2d(x, kernel_size=k))
        return out

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return list(channel_list)


@NECK_REGISTRY.register
class ReshapeTokensToImage(Neck):
    """Turn ViT tokens ``[B, (1+) t*h*w, D]`` into maps ``[B, D*t, h, w]``.

    The grid ``(h, w)`` comes from, in order: ``h`` if given; else the input ``image_size`` divided by
    ``patch_size`` (given, or inferred from the token count and the image's aspect ratio), which handles
    non-square inputs; else a square grid. A token count that fits none of these is an error.

    Args:
        channel_list: channels of the incoming features. Unchanged: an encoder with ``t`` effective frames
            already reports ``D*t`` (Prithvi's ``out_channels``).
        remove_cls_token: drop the first token (the cls token).
        effective_time_dim: ``num_frames // tubelet_size``; the time steps are folded into channels.
        h: grid height, when it cannot be derived.
        patch_size: the encoder's spatial patch size (int or ``(ph, pw)``); inferred when ``None``.
    """

    def __init__(
        self,
        channel_list: Sequence[int],
        remove_cls_token: bool = True,
        effective_time_dim: int = 1,
        h: int | None = None,
        patch_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(channel_list)
        check_int(effective_time_dim, "ReshapeTokensToImage: effective_time_dim",
                  fix="the number of time steps the tokens hold, e.g. 1 for one frame")
        check_int(h, "ReshapeTokensToImage: h", optional=True, fix="the token grid height, or null to infer a square grid")
        if patch_size is not None:
            ps = [patch_size] * 2 if isinstance(patch_size, int) else list(patch_size)[-2:]
            if len(ps) != 2 or not all(isinstance(p, int) and p > 0 for p in ps):
                raise ValueError(f"ReshapeTokensToImage: patch_size must be a positive int or (h, w), got {patch_size!r}")
            patch_size = (ps[0], ps[1])
        self.remove_cls_token = bool(remove_cls_token)
        self.effective_time_dim = effective_time_dim
        self.h = h
        self.patch_size: tuple[int, int] | None = patch_size

    def _grid(self, n: int, image_size: tuple[int, int] | None) -> tuple[int, int]:
        if self.h is not None:
            if n % self.h:
                raise ValueError(f"ReshapeTokensToImage: {n} tokens per time step do not divide into rows of h={self.h}")
            return self.h, n // self.h
        if image_size is not None:
            H, W = int(image_size[0]), int(image_size[1])
            if self.patch_size is not None:
                gh, gw = H // self.patch_size[0], W // self.patch_size[1]
                if gh * gw == n:
                    return gh, gw
                raise ValueError(
                    f"ReshapeTokensToImage: an image of {H}x{W} with patch_size={self.patch_size} gives a {gh}x{gw} "
                    f"grid, but the encoder returned {n} tokens per time step (remove_cls_token="
                    f"{self.remove_cls_token}); check patch_size and remove_cls_token"
                )
            # infer a square patch: the encoder saw H x W and returned n tokens (floor or ceil division)
            estimate = math.sqrt(H * W / n)
            for p in sorted({max(1, math.floor(estimate)), max(1, math.ceil(estimate))}):
                for gh, gw in ((H // p, W // p), (-(-H // p), -(-W // p))):
                    if gh * gw == n:
                        return gh, gw
        side = math.isqrt(n)
        if side * side == n:
            return side, side
        raise ValueError(
            f"ReshapeTokensToImage: cannot arrange {n} tokens per time step into a grid (image_size={image_size}, "
            f"remove_cls_token={self.remove_cls_token}, effective_time_dim={self.effective_time_dim}); pass h= or "
            "patch_size=, or set remove_cls_token=False if the encoder returns no cls token"
        )

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        out = []
        for i, x in enumerate(features):
            if x.dim() != 3:
                raise ValueError(
                    f"ReshapeTokensToImage expects ViT tokens [B, tokens, D] but feature {i} has shape "
                    f"{tuple(x.shape)}; remove this neck for encoders that already return [B, C, H, W] maps"
                )
            tokens = x[:, 1:] if self.remove_cls_token else x
            b, n, d = tokens.shape
            t = self.effective_time_dim
            if n % t:
                raise ValueError(
                    f"ReshapeTokensToImage: {n} tokens do not split into effective_time_dim={t} equal time steps"
                )
            gh, gw = self._grid(n // t, image_size)
            # tokens are ordered (t, h, w); time folds into channels as (t, d), TerraTorch's layout
            out.append(tokens.reshape(b, t, gh, gw, d).permute(0, 1, 4, 2, 3).reshape(b, t * d, gh, gw))
        return out

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return list(channel_list)


@NECK_REGISTRY.register
class AddBottleneckLayer(Neck):
    """Append a 1x1-conv projection of the last feature to half its channels (for some smp decoders).

    Args:
        channel_list: channels of the incoming features; the last must be >= 2.
    """

    def __init__(self, channel_list: Sequence[int]) -> None:
        super().__init__(channel_list)
        last = self.channel_list[-1]
        if last < 2:
            raise ValueError(f"AddBottleneckLayer halves the last feature's channels, which needs >= 2, got {last}")
        self.bottleneck = nn.Conv2d(last, last // 2, kernel_size=1)

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        check_feature_maps(features, "AddBottleneckLayer", [-1])
        return [*features, self.bottleneck(features[-1])]  # a new list: the caller's stays intact

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return [*channel_list, channel_list[-1] // 2]


@NECK_REGISTRY.register
class LearnedInterpolateToPyramidal(Neck):
    """Learned ViT-to-pyramid: four same-size maps become x4 (ConvT, norm, GELU, ConvT), x2 (ConvT),
    x1 (identity) and x0.5 (max-pool) levels with channels ``[c0//4, c1//2, c2, c3]``.

    Args:
        channel_list: exactly four entries (use ``SelectIndices`` first to pick four ViT blocks).
        norm: norm between the two transposed convs (``batch`` as TerraTorch; see ``encdec.models.norms``).
    """

    def __init__(self, channel_list: Sequence[int], norm: str = "batch") -> None:
        super().__init__(channel_list)
        if len(self.channel_list) != 4:
            raise ValueError(
                f"LearnedInterpolateToPyramidal needs exactly 4 input features, got {len(self.channel_list)} "
                f"(channel_list={self.channel_list}); select four with a SelectIndices neck before it"
            )
        self.norm = check_norm(norm, "LearnedInterpolateToPyramidal")
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = learned_pyramid(self.channel_list, norm)

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        if len(features) != 4:
            raise ValueError(f"LearnedInterpolateToPyramidal needs exactly 4 features, received {len(features)}")
        check_feature_maps(features, "LearnedInterpolateToPyramidal")
        return [self.fpn1(features[0]), self.fpn2(features[1]), self.fpn3(features[2]), self.fpn4(features[3])]

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return [channel_list[0] // 4, channel_list[1] // 2, channel_list[2], channel_list[3]]


@NECK_REGISTRY.register
class AggregateTokens(Neck):
    """Pool each selected feature to one vector ``[B, C]`` (for classification / scalar heads).

    Tokens ``[B, N, D]`` are pooled over N; maps ``[B, C, H, W]`` over H and W (``cls`` and token-index
    pooling need tokens). ``process_channel_list`` returns the channels of the selected features, which is
    what ``forward`` returns (TerraTorch reports the unselected list).

    Args:
        channel_list: channels of the incoming features.
        pooling: ``mean``, ``max``, ``min``, ``cls`` (the first token) or an int token index.
        indices: features to pool (int or list); default ``[-1]``.
        drop_cls: ignore the first token of token features for ``mean``/``max``/``min`` (ViTs with a cls token).
        index: TerraTorch's deprecated single-index spelling; used when ``indices`` is not given.
    """

    def __init__(
        self,
        channel_list: Sequence[int],
        pooling: str | int = "mean",
        indices: int | Sequence[int] | None = None,
        drop_cls: bool = False,
        index: int | None = None,
    ) -> None:
        super().__init__(channel_list)
        if indices is not None and index is not None:
            raise ValueError("AggregateTokens: give indices or the deprecated index, not both")
        chosen = indices if indices is not None else (index if index is not None else -1)
        picks = _as_index_list(chosen, "AggregateTokens", "indices")
        self.indices = [check_index(i, self.channel_list, "AggregateTokens", "indices entry") for i in picks]
        if isinstance(pooling, str):
            pooling = pooling.lower()
            if pooling not in _POOLINGS:
                raise ValueError(
                    f"AggregateTokens: pooling={pooling!r} is not supported; use one of {_POOLINGS} or a token index"
                )
        elif isinstance(pooling, bool) or not isinstance(pooling, int):
            raise TypeError(f"AggregateTokens: pooling must be a str or an int token index, got {pooling!r}")
        if drop_cls and pooling == "cls":
            raise ValueError("AggregateTokens: drop_cls=True contradicts pooling='cls' (it would drop the cls token)")
        self.pooling: str | int = pooling
        self.drop_cls = bool(drop_cls)

    def _pool(self, x: Tensor, i: int) -> Tensor:
        if x.dim() == 4:
            if not isinstance(self.pooling, str) or self.pooling == "cls":
                raise ValueError(
                    f"AggregateTokens: pooling={self.pooling!r} needs tokens [B, N, D], but feature {i} is a map "
                    f"{tuple(x.shape)}; use mean, max or min"
                )
            x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]: pool maps like tokens
        elif x.dim() != 3:
            raise ValueError(f"AggregateTokens expects [B, N, D] tokens or [B, C, H, W] maps, feature {i} is {tuple(x.shape)}")
        elif self.drop_cls:
            x = x[:, 1:]
        if isinstance(self.pooling, int):
            return x[:, self.pooling]
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "mean":
            return x.mean(dim=1)
        if self.pooling == "max":
            return x.amax(dim=1)
        return x.amin(dim=1)

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        if len(features) != len(self.channel_list):
            raise ValueError(
                f"AggregateTokens was built for {len(self.channel_list)} features but received {len(features)}"
            )
        return [self._pool(features[i], i) for i in self.indices]

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return [channel_list[i] for i in self.indices]



@NECK_REGISTRY.register
class FeaturePyramidNetworkNeck(Neck):
    """torchvision's ``FeaturePyramidNetwork`` over the maps (TerraTorch's neck of the same name): every level gets
    ``out_channel`` channels, top-down merged. The module sits at ``fpn`` as in TerraTorch, so keys match.

    Args:
        channel_list: channels of the incoming maps, shallowest first.
        out_channel: channels of every output level.
        output_ordered_dict: must be False. TerraTorch's default True returns an ``OrderedDict``, which its
            pixel-wise and scalar models then fail to pass to a decoder.
    """

    def __init__(self, channel_list: Sequence[int], out_channel: int = 256, output_ordered_dict: bool = True) -> None:
        super().__init__(channel_list)
        from torchvision.ops import FeaturePyramidNetwork  # torchvision is imported only when this neck is used

        if output_ordered_dict:
            raise ValueError(
                "FeaturePyramidNetworkNeck: output_ordered_dict=True returns an OrderedDict, which no decoder takes "
                "(TerraTorch fails on it too); set output_ordered_dict: false"
            )
        self.out_channel = check_int(out_channel, "FeaturePyramidNetworkNeck: out_channel")
        self.fpn = FeaturePyramidNetwork(self.channel_list, out_channel)

    def forward(self, features: list[Tensor], image_size: tuple[int, int] | None = None) -> list[Tensor]:
        check_feature_maps(features, "FeaturePyramidNetworkNeck")
        named = OrderedDict((f"feat{i}", x) for i, x in enumerate(features))
        return list(self.fpn(named).values())

    def process_channel_list(self, channel_list: list[int]) -> list[int]:
        return [self.out_channel] * len(channel_list)
