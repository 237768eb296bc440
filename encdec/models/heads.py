"""Task heads put after a decoder: segmentation, pixel-wise regression, classification / scalar regression."""

from __future__ import annotations

from torch import Tensor, nn

from encdec.config.checks import check_int
from encdec.models.norms import conv_bias, make_norm2d

__all__ = [
    "ClassificationHead",
    "PixelShuffleUpscale",
    "RegressionHead",
    "ScalarHead",
    "SegmentationHead",
    "resolve_activation",
]


def resolve_activation(act: str | nn.Module | None) -> nn.Module:
    """``None`` -> Identity; a name of a ``torch.nn`` activation (``"ReLU"``, ``"Sigmoid"``...) -> its instance."""
    if act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    if isinstance(act, str):
        name = act.split(".")[-1]  # accept "torch.nn.ReLU" as TerraTorch configs sometimes write it
        cls = getattr(nn, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls()
    raise ValueError(
        f"final_act {act!r} is not a torch.nn activation; use a class name such as 'ReLU', 'Sigmoid', 'Softplus' or None"
    )


def _conv_stack(in_ch: int, channels: list[int] | None, norm: str) -> tuple[nn.Sequential, int]:
    """3x3 conv + norm + ReLU per entry of ``channels``, flat (``hidden.<3i>`` is block i's conv).

    With ``norm="none"`` a block is TerraTorch's segmentation block (conv with bias, ReLU; the Identity keeps the
    numbering); with ``norm="batch"`` its regression block (conv without bias, BatchNorm, ReLU).
    """
    layers: list[nn.Module] = []
    for ch in channels or []:
        layers += [nn.Conv2d(in_ch, ch, 3, padding=1, bias=conv_bias(norm)), make_norm2d(norm, ch), nn.ReLU()]
        in_ch = ch
    return nn.Sequential(*layers), in_ch


class SegmentationHead(nn.Module):
    """Optional 3x3 conv stack (``channel_list``), dropout, then a 1x1 conv to ``num_classes``.

    As TerraTorch's ``SegmentationHead``: the conv blocks have a bias and no norm (``norm="none"``, the default;
    another norm is our addition) and the dropout is element-wise ``nn.Dropout``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channel_list: list[int] | None = None,
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        self.hidden, ch = _conv_stack(in_channels, channel_list, norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.final = nn.Conv2d(ch, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.final(self.dropout(self.hidden(x)))


class PixelShuffleUpscale(nn.Module):
    """2x learned upsampling of TerraTorch's regression head: 3x3 conv to 4C, PixelShuffle(2), norm, ReLU.

    Attribute names (``conv``, ``bn``) are TerraTorch's so the keys map one to one.
    """

    def __init__(self, channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 4, 3, padding=1)
        self.upscale = nn.PixelShuffle(2)
        self.bn = make_norm2d(norm, channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.upscale(self.conv(x))))


class RegressionHead(nn.Module):
    """Pixel-wise regression as TerraTorch's ``RegressionHead``: ``learned_upscale_layers`` x2 PixelShuffle
    upsamplings, optional conv stack (conv without bias, BatchNorm, ReLU), channel-wise ``nn.Dropout2d``, 1x1 conv
    to ``num_outputs`` and ``final_act``.

    Args:
        batch_norm: accepted because TerraTorch's signature has it; TerraTorch ignores it (its blocks always have
            BatchNorm), so only ``True`` is accepted here; choose the norm with ``norm``.
    """

    def __init__(
        self,
        in_channels: int,
        final_act: str | nn.Module | None = None,
        learned_upscale_layers: int = 0,
        channel_list: list[int] | None = None,
        dropout: float = 0.0,
        num_outputs: int = 1,
        norm: str = "batch",
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if batch_norm is not True:
            raise ValueError(
                f"head_batch_norm={batch_norm!r} has no effect in TerraTorch 1.2 (its regression head always uses "
                "BatchNorm) and is not supported here; remove it, or set head_norm: none | group | layer | "
                "frozen_batch to change the norm"
            )
        check_int(learned_upscale_layers, "learned_upscale_layers", minimum=0)
        self.upscale = nn.Sequential(*(PixelShuffleUpscale(in_channels, norm) for _ in range(learned_upscale_layers)))
        self.hidden, ch = _conv_stack(in_channels, channel_list, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.final = nn.Conv2d(ch, num_outputs, 1)
        self.final_act = resolve_activation(final_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.final_act(self.final(self.dropout(self.hidden(self.upscale(x)))))


def _pool(x: Tensor) -> Tensor:
    """Global average: ``[B,C,H,W]`` over H,W; ``[B,N,D]`` tokens over N; ``[B,D]`` unchanged."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    return x


class ClassificationHead(nn.Module):
    """Pool, then an MLP over ``dim_list`` (Linear + ReLU each), element-wise dropout and a Linear to
    ``num_classes`` (TerraTorch's ``ScalarHead`` with ``linear_after_pool=True``; see ``linear_after_pool``).

    Args:
        linear_after_pool: ``False`` (TerraTorch's default) applies the MLP to every pixel of a ``[B, C, H, W]``
            map and averages its outputs; ``True`` averages first. Equal without ``dim_list`` (a Linear commutes
            with the mean); token inputs ``[B, N, D]`` are always pooled first.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim_list: list[int] | None = None,
        dropout: float = 0.0,
        linear_after_pool: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d in dim_list or []:
            # the Identity keeps the round-1 numbering (hidden.<3i> is block i's Linear)
            layers += [nn.Linear(in_dim, d), nn.ReLU(), nn.Identity()]
            in_dim = d
        self.hidden = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.final = nn.Linear(in_dim, num_classes)
        self.linear_after_pool = bool(linear_after_pool)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and not self.linear_after_pool:
            tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, C], TerraTorch's per-pixel MLP
            return self.final(self.dropout(self.hidden(tokens))).mean(dim=1)
        return self.final(self.dropout(self.hidden(_pool(x))))


class ScalarHead(ClassificationHead):
    """Scalar regression: a ClassificationHead with ``num_outputs`` outputs and an optional ``final_act``."""

    def __init__(
        self,
        in_dim: int,
        num_outputs: int = 1,
        dim_list: list[int] | None = None,
        dropout: float = 0.0,
        final_act: str | nn.Module | None = None,
        linear_after_pool: bool = False,
    ) -> None:
        super().__init__(in_dim, num_outputs, dim_list, dropout, linear_after_pool)
        self.final_act = resolve_activation(final_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.final_act(super().forward(x))
