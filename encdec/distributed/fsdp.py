"""``fsdp``: FSDP2 ``fully_shard`` on each sharding unit (transformer block, decoder), then on the root.

Parameters become DTensors sharded on dim 0 across ranks; the optimizer is built after sharding. Frozen base
weights and trainable LoRA adapters may share a unit (only the trainable ones need one dtype).

bf16/fp16: the MixedPrecisionPolicy all-gathers parameters in the compute dtype (sharded fp32 masters, fp32
gradient reduction); ``autocast()`` (torch.autocast, inherited) covers ops whose inputs come from fp32 buffers
(e.g. frozen BatchNorm statistics, position embeddings), which the policy does not cast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from encdec.distributed.strategy import StrategyError
from encdec.distributed.torch_common import TorchStrategy, convert_sync_batchnorm, sharding_units

__all__ = ["FSDPStrategy"]


class FSDPStrategy(TorchStrategy):
    """Fully sharded data parallel (FSDP2).

    Args:
        reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3 like, least memory);
            False keeps them until backward (ZeRO-2 like, fewer all-gathers).
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm (GPUs only).
        **kwargs: see ``Strategy``.
    """

    name = "fsdp"

    def __init__(self, *, reshard_after_forward: bool = True, sync_batchnorm: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.sync_batchnorm = bool(sync_batchnorm)

    def _mp_policy(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = self._autocast_dtype()
        if dtype is None:
            return MixedPrecisionPolicy()
        # compute in bf16/fp16, reduce gradients in fp32 so the sharded fp32 master weights see exact sums
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    def _wrap(self, model: nn.Module) -> nn.Module:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise StrategyError(
                "strategy 'fsdp' needs a process group; call encdec.distributed.init_process_group() first "
                "(under Ray Train or torchrun it finds the environment), or use strategy 'none' for one process"
            )
        model = model.to(self.device)
        if self.sync_batchnorm:  # converts in place below the root (the root is never a BatchNorm here)
            model = convert_sync_batchnorm(model, self.device)
        mp = self._mp_policy()
        for unit in sharding_units(model):
            fully_shard(unit, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        # the root's own parameters (patch embedding, necks, head) form the last group; it is not resharded
        # after forward because backward needs it first
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)
        return model

    @contextlib.contextmanager
    def _sync(self, flag: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(flag)  # type: ignore[operator]
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def no_sync(self, is_last_micro: bool) -> contextlib.AbstractContextManager[None]:
        """Skip reduce-scatter of gradients on all but the last micro-batch (they accumulate unsharded)."""
        if is_last_micro:
            return contextlib.nullcontext()
        return self._sync(False)
