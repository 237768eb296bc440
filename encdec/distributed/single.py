"""``none``: one process, no wrapper. Shares stepping and DCP checkpoints with ddp/fsdp (torch_common)."""

from __future__ import annotations

import contextlib

from torch import nn

from encdec.distributed.torch_common import TorchStrategy

__all__ = ["SingleProcessStrategy"]


class SingleProcessStrategy(TorchStrategy):
    """Train in this process only; checkpoints are DCP and load into ddp/fsdp at any world size."""

    name = "none"

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def no_sync(self, is_last_micro: bool) -> contextlib.AbstractContextManager[None]:
        """Nothing to synchronise in one process."""
        return contextlib.nullcontext()
