"""Task heads put after a decoder: segmentation, pixel-wise regression, classification / scalar regression."""

from __future__ import annotations

from torch import Tensor, nn

from encdec.models.norms import conv_bias, make_norm2d

__all__ = ["ClassificationHead", "RegressionHead", "ScalarHead", "SegmentationHead", "resolve_activation"]


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
    layers: list[nn.Module] = []
    for ch in channels or []:
        layers += [nn.Conv2d(in_ch, ch, 3, padding=1, bias=conv_bias(norm)), make_norm2d(norm, ch), nn.ReLU()]
        in_ch = ch
    return nn.Sequential(*layers), in_ch


class SegmentationHead(nn.Module):
    """Optional 3x3 conv stack (``channel_list``), dropout, then a 1x1 conv to ``num_classes``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channel_list: list[int] | None = None,
        dropout: float = 0.0,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.hidden, ch = _conv_stack(in_channels, channel_list, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.final = nn.Conv2d(ch, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.final(self.dropout(self.hidden(x)))


class RegressionHead(nn.Module):
    """Pixel-wise regression: ``learned_upscale_layers`` x2 transposed-conv upsamplings, optional conv stack,
    dropout, 1x1 conv to ``num_outputs`` and ``final_act``."""

    def __init__(
        self,
        in_channels: int,
        final_act: str | nn.Module | None = None,
        learned_upscale_layers: int = 0,
        channel_list: list[int] | None = None,
        dropout: float = 0.0,
        num_outputs: int = 1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        up: list[nn.Module] = []
        for _ in range(learned_upscale_layers):
            up += [nn.ConvTranspose2d(in_channels, in_channels, 2, 2), make_norm2d(norm, in_channels), nn.ReLU()]
        self.upscale = nn.Sequential(*up)
        self.hidden, ch = _conv_stack(in_channels, channel_list, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
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
    """Pool, then an MLP over ``dim_list`` (Linear + ReLU + dropout each) and a Linear to ``num_classes``."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim_list: list[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d in dim_list or []:
            layers += [nn.Linear(in_dim, d), nn.ReLU(), nn.Dropout(dropout) if dropout > 0 else nn.Identity()]
            in_dim = d
        self.hidden = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.final = nn.Linear(in_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
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
    ) -> None:
        super().__init__(in_dim, num_outputs, dim_list, dropout)
        self.final_act = resolve_activation(final_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.final_act(super().forward(x))
