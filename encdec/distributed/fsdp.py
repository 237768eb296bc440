"""``fsdp``: FSDP2 ``fully_shard`` on each sharding unit (transformer block, decoder), then on the root.

Parameters become DTensors sharded on dim 0 across ranks; the optimizer is built after sharding. Frozen base
weights and trainable LoRA adapters may share a unit (only the trainable ones need one dtype).

``build_on_rank0`` (default): only rank 0 holds the whole model in memory. The loop builds it for real on rank 0
(pretrained and ``init_from`` weights loaded) and on the meta device elsewhere (``meta_build``); ``setup`` keeps
rank 0's full state dict, moves every rank's model to the meta device, shards it, allocates each rank's shards
(``to_empty``) and broadcasts rank 0's values into them one tensor at a time (parameters, PEFT adapters, and every
buffer, also those outside the state dict). A rank > 0 so never allocates more than its shards, and rank 0 no
more than its full copy plus one tensor.

Gradients are reduce-scattered as sums (divide factor 1, sum-only collectives, as torchtitan sets it): the loop's
losses are already normalised for the global batch (``Strategy.backward``), so FSDP2 must not average them.

bf16/fp16: the MixedPrecisionPolicy all-gathers parameters in the compute dtype (sharded fp32 masters, fp32
gradient reduction); ``autocast()`` (torch.autocast, inherited) covers ops whose inputs come from fp32 buffers
(e.g. frozen BatchNorm statistics, position embeddings), which the policy does not cast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from encdec.distributed.strategy import StrategyError
from encdec.distributed.torch_common import TorchStrategy, convert_sync_batchnorm, sharding_units

__all__ = ["FSDPStrategy", "disable_gradient_division"]


class FSDPStrategy(TorchStrategy):
    """Fully sharded data parallel (FSDP2).

    Args:
        reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3 like, least memory);
            False keeps them until backward (ZeRO-2 like, fewer all-gathers).
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm (GPUs only).
        build_on_rank0: materialise the model from rank 0's weights at set-up (other ranks build it on the meta
            device and never hold it whole); False: every rank builds the same model and shards its own copy.
        **kwargs: see ``Strategy``.
    """

    name = "fsdp"

    def __init__(self, *, reshard_after_forward: bool = True, sync_batchnorm: bool = False,
                 build_on_rank0: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.sync_batchnorm = bool(sync_batchnorm)
        self.build_on_rank0 = bool(build_on_rank0)

    @property
    def _broadcasts(self) -> bool:
        return self.build_on_rank0 and self.world_size > 1

    @property
    def meta_build(self) -> bool:
        """Ranks > 0 build on the meta device when ``build_on_rank0`` (rank 0's weights reach them in setup)."""
        return self._broadcasts and self.rank != 0

    def store_frozen_weights(self, model: nn.Module, precision: str) -> dict[str, int]:
        """Nothing: the MixedPrecisionPolicy casts the gathered parameters (frozen ones included) itself."""
        return {"frozen_cast": 0, "adapters": 0}

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
        broadcast = self._broadcasts
        full: dict[str, Tensor] = {}
        loose: dict[str, Tensor] = {}
        if broadcast:
            if self.rank == 0:
                if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                    raise StrategyError("fsdp build_on_rank0: rank 0's model must be materialised (built on the CPU, "
                                        "weights loaded), not on the meta device")
                full, loose = _rank0_state(model)
            model.to("meta")  # every rank shards an empty model; rank 0's full state is kept in `full`
        else:
            model = model.to(self.device)
        if self.sync_batchnorm:  # converts in place below the root (the root is never a BatchNorm here)
            model = convert_sync_batchnorm(model, self.device)
        mp = self._mp_policy()
        _shard_batchnorm_in_fp32(model, mp, self.reshard_after_forward)
        for unit in sharding_units(model):
            fully_shard(unit, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        # the root's own parameters (patch embedding, necks, head) form the last group; it is not resharded
        # after forward because backward needs it first
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)
        disable_gradient_division(model)
        if broadcast:
            model.to_empty(device=self.device)  # this rank's shards only
            _fill_from_rank0(model, full, loose, self.rank, self.device)
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


def _shard_batchnorm_in_fp32(model: nn.Module, mp: Any, reshard_after_forward: bool) -> int:
    """Shard each affine BatchNorm as its own FSDP2 group computing in fp32; returns how many.

    Under a bf16/fp16 policy a BatchNorm inside a unit would get its weight all-gathered in bf16 while its running
    statistics stay fp32 buffers, and cuDNN's BatchNorm refuses that mix in backward ("Expected running_mean to
    have type BFloat16 but got Float"; seen on an H200, the CPU kernels accept it). In its own fp32 group the
    layer keeps fp32 weights and statistics (inputs are cast up by the policy), as autocast would run it.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.modules.batchnorm import _BatchNorm

    if mp.param_dtype is None or mp.param_dtype == torch.float32:
        return 0
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.affine]
    for norm in norms:  # leaves: sharded before the units that hold them, as fully_shard requires
        fully_shard(norm, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
    return len(norms)


def disable_gradient_division(model: nn.Module) -> int:
    """Make every FSDP2 unit of ``model`` reduce gradients as plain sums; returns how many units were set.

    ``set_gradient_divide_factor`` is per unit (not recursive). ``set_force_sum_reduction_for_comms`` keeps the
    collective a SUM (no PREMUL_SUM, which gloo lacks) and, with factor 1, FSDP2 then scales nothing at all.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return len(units)


def _rank0_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rank 0's full state dict and its buffers outside the state dict (non-persistent ones: e.g. index tables)."""
    full = model.state_dict()
    loose = {name: buf for name, buf in model.named_buffers() if name not in full}
    return full, loose


def _fill_from_rank0(model: nn.Module, full: dict[str, Tensor], loose: dict[str, Tensor], rank: int,
                     device: torch.device) -> None:
    """Broadcast rank 0's values into every rank's freshly allocated (``to_empty``) shards and buffers.

    One tensor at a time, each rank keeping its own slice, and rank 0 dropping each full tensor once it is sent:
    rank 0's peak is its full copy plus one tensor (``set_model_state_dict(broadcast_from_rank0=True)`` does the
    same broadcast but keeps every full tensor referenced until the end, adding a whole shard set on rank 0).

    Raises:
        StrategyError: rank 0's state holds a key the sharded model has no tensor for, or a shape differs.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    targets: dict[str, Tensor] = dict(model.named_parameters())
    targets.update(model.named_buffers())
    problem: list[str | None] = [None]
    if rank == 0:
        extra = sorted(set(full) - set(targets))
        missing = sorted(set(targets) - set(full) - set(loose))
        wrong = sorted(k for k, v in {**full, **loose}.items() if k in targets and v.shape != targets[k].shape)
        if extra or missing or wrong:
            problem[0] = (f"keys without a tensor in the sharded model {extra[:10]}, tensors rank 0 has no value "
                          f"for {missing[:10]}, shape mismatches {wrong[:10]}")
    dist.broadcast_object_list(problem, src=0)  # every rank fails together instead of waiting in a collective
    if problem[0] is not None:
        raise StrategyError(f"fsdp build_on_rank0: rank 0's model does not match the sharded one: {problem[0]}")
    wire = device if device.type == "cuda" else torch.device("cpu")  # NCCL moves device tensors, gloo CPU ones
    with torch.no_grad():
        for name, target in targets.items():
            if rank == 0:
                value = full.pop(name) if name in full else loose.pop(name)
                src = value.detach().to(device=wire, dtype=target.dtype)
                del value
            else:
                src = torch.empty(target.shape, dtype=target.dtype, device=wire)
            dist.broadcast(src, src=0)
            if isinstance(target, DTensor):
                shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                      target.placements)
                target.to_local().copy_(src[tuple(slice(o, o + n) for n, o in zip(shape, offset))])
            else:
                target.copy_(src)
            del src
