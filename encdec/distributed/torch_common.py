"""What the torch-native strategies (none, ddp, fsdp) share: stepping, loss scaling, frozen-weight storage
under autocast, and DCP checkpoints.

Checkpoints use torch.distributed.checkpoint (DCP) with state dicts keyed by the unwrapped model's parameter
names (``get_state_dict``), so a checkpoint written by any of none/ddp/fsdp at any world size loads into any of
them at any other world size: DCP reshards on load.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from encdec.distributed.frozen_storage import store_for_autocast
from encdec.distributed.strategy import Strategy, StrategyError

if TYPE_CHECKING:
    from encdec.config import OptimSection

__all__ = ["TorchStrategy", "apply_activation_checkpointing", "sharding_units"]

DCP_FORMAT = "dcp"


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The model's own sharding units (each transformer block, the decoder), or its direct children."""
    units = getattr(model, "sharding_units", None)
    if callable(units):
        return [u for u in units() if isinstance(u, nn.Module)]
    return list(model.children())


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each sharding unit's activations in backward (composable API: parameter names are unchanged).

    Returns:
        The number of units checkpointed.
    """
    from torch.distributed._composable import checkpoint

    # frozen blocks too: with LoRA inside them (or anything trainable upstream) they store activations for backward
    units = sharding_units(model)
    for unit in units:
        checkpoint(unit)
    return len(units)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (statistics over the global batch). torch implements it for GPUs only.

    Raises:
        StrategyError: on CPU, where torch's SyncBatchNorm refuses to run.
    """
    if device.type == "cpu":
        raise StrategyError(
            "sync_batchnorm=True needs GPUs: torch's SyncBatchNorm does not run on CPU. On CPU use norms without "
            "batch statistics (norm: group | frozen_batch | layer) or keep per-rank BatchNorm (sync_batchnorm=False)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class TorchStrategy(Strategy):
    """Base for none/ddp/fsdp: subclasses implement ``_wrap`` (place + shard) and ``no_sync``."""

    def setup(
        self,
        model: nn.Module,
        optim_cfg: OptimSection | Mapping[str, Any],
        *,
        precision: str,
        grad_accum: int,
        activation_checkpointing: bool,
    ) -> None:
        """See ``Strategy.setup``."""
        optim = self._check_setup_args(model, optim_cfg, precision, grad_accum)
        self._unwrapped = model
        if activation_checkpointing:
            apply_activation_checkpointing(model)
        self._model = self._wrap(model)
        self._optimizer = self._build_optimizer(self._unwrapped, optim)
        self._scaler = None
        if precision == "fp16":
            self._scaler = torch.amp.GradScaler(self.device.type)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and shard/wrap it; returns what forward is called on."""
        raise NotImplementedError

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (for FSDP2: the same object, sharded in place)."""
        if self._model is None:
            raise StrategyError(f"strategy {self.name!r}: call setup(model, ...) before using .module")
        return self._unwrapped

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """``torch.autocast`` to bf16/fp16 for the forward + loss; nothing in fp32."""
        dtype = self._autocast_dtype()
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def store_frozen_weights(self, model: nn.Module, precision: str) -> dict[str, int]:
        """Frozen linear/conv weights in the compute dtype once (forward runs under autocast); see
        ``encdec.distributed.frozen_storage``."""
        return store_for_autocast(model, precision)

    def backward(self, loss: Tensor) -> None:
        """Backward of the already-normalised ``loss`` (loss-scaled in fp16); the wrapper sums over ranks."""
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        loss.backward()

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def step(self, max_norm: float | None) -> float:
        """Unscale (fp16), clip, step, zero grads; returns the total grad norm before clipping."""
        params = [p for p in self._trainable() if p.grad is not None]
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        total = _total_norm(params)
        if max_norm is not None and max_norm > 0 and math.isfinite(total):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(total, device=self.device))
        if self._scaler is not None:
            self._scaler.step(self.optimizer)  # skips the step when grads hold inf/nan
            self._scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    # ------------------------------------------------------------------ checkpoints (DCP)
    def _state_options(self, *, full: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(
            full_state_dict=full,
            cpu_offload=full,
            ignore_frozen_params=self.adapter_only and not full,
        )

    def save(self, ckpt_dir: str | Path, extra: Mapping[str, Any]) -> None:
        """DCP save of model + optimizer (+ loss scaler) into an atomic directory; see ``Strategy.save``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=self._state_options())
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if self._scaler is not None:
            extra = {**dict(extra), "grad_scaler": self._scaler.state_dict()}
        with self._writing(ckpt_dir, DCP_FORMAT, extra) as tmp, _one_process():
            dcp.save(state, checkpoint_id=str(tmp / "state"))

    def load(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """DCP load (resharding to this world size); see ``Strategy.load``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        from encdec.distributed.ckpt_io import CheckpointError
        from encdec.distributed.dcp_safe import SafeDcpLoadPlanner, SafeFileSystemReader, load_dcp_metadata
        from encdec.models.model import recomputed_state_keys
        from encdec.models.safe_load import UnsafeGlobalError

        meta = self._read_checkpoint_meta(ckpt_dir, DCP_FORMAT, "none/ddp/fsdp")
        adapter_only = bool(meta.get("adapter_only", False))
        options = StateDictOptions(ignore_frozen_params=adapter_only)
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=options)
        # fixed tables (Prithvi's pos_embed) are not read: round-1 checkpoints lack them, the model recomputes them
        fixed = {k: model_sd.pop(k) for k in recomputed_state_keys(self.module) if k in model_sd}
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        state_dir = Path(ckpt_dir) / "state"
        try:
            with open(state_dir / ".metadata", "rb") as f:  # refused here with a clear message
                dcp_meta = load_dcp_metadata(f, str(state_dir / ".metadata"))
            with _one_process():
                # DCP's own reader unpickles .metadata and byte items with plain pickle: a shared run directory
                # must not run code, so both go through restricted unpicklers (dcp_safe); the reader is handed
                # the metadata read above rather than unpickling the file a second time
                dcp.load(state, storage_reader=SafeFileSystemReader(str(state_dir), metadata=dcp_meta),
                         planner=SafeDcpLoadPlanner())
        except (UnsafeGlobalError, pickle.UnpicklingError, OSError) as e:
            raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} was refused: {e}") from None
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            refused = _refusal(e)  # a byte item refused inside DCP (SafeDcpLoadPlanner), wrapped by it
            if refused is not None:
                raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} was refused: {refused}") from None
            raise CheckpointError(
                f"checkpoint {str(ckpt_dir)!r} does not fit this model/optimizer (adapter_only={adapter_only}): {e}"
            ) from e
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict={**state["model"], **fixed},
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=not adapter_only),
        )
        extra = self._load_extra(ckpt_dir)
        scaler_state = extra.pop("grad_scaler", None)
        if self._scaler is not None and scaler_state is not None:
            self._scaler.load_state_dict(scaler_state)
        return extra

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """Gathered plain state dict (CPU, fp32) on rank 0; None elsewhere."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(self.module, options=self._state_options(full=True))
        if self.rank != 0:
            return None
        return {k: _plain(v) for k, v in sd.items()}


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _refusal(exc: BaseException) -> BaseException | None:
    """The restricted unpicklers' refusal (``UnsafeGlobalError`` / ``UnpicklingError``) inside DCP's
    ``CheckpointException``, whose ``failures`` maps each failed rank to ``(exception, traceback summary)``."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, Mapping):
        return None
    for failure in failures.values():
        err = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(err, pickle.UnpicklingError):  # UnsafeGlobalError is one
            return err
    return None


def _plain(t: Any) -> Any:
    if isinstance(t, Tensor):
        t = t.detach().cpu()
        return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t
    return t


def _total_norm(params: list[nn.Parameter]) -> float:
    """L2 norm over all grads; DTensor (FSDP2) partial norms are reduced across ranks."""
    if not params:
        return 0.0
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    full = getattr(norm, "full_tensor", None)
    if callable(full):
        norm = full()
    return float(norm)
