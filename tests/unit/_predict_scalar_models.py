"""Tiny scalar models for the scalar predict tests (``[B, C, H, W] -> [B, K]``; seeded, CPU, milliseconds). A
module of the ``tests`` package, so Ray workers unpickle them by reference."""

from __future__ import annotations

import torch
from torch import nn

from tests.unit._predict_models import DiesOnceMixin


class TinyScalar(nn.Module):
    """``[B, C, H, W] -> [B, K]`` (or ``[B]`` with ``k=0``): a convolution, global mean pool, a linear layer."""

    def __init__(self, in_ch: int = 3, k: int = 4) -> None:
        super().__init__()
        self.k = k
        self.conv = nn.Conv2d(in_ch, 8, 3, padding=1)
        self.fc = nn.Linear(8, max(k, 1))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        return y[:, 0] if self.k == 0 else y


class DiesOnceScalar(DiesOnceMixin, TinyScalar):
    """:class:`TinyScalar` that kills its worker on its 2nd forward, once per marker file."""

    die_at = 2
