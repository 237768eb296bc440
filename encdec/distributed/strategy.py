"""The ``Strategy`` interface: how a model is sharded, stepped and checkpointed across ranks.

One implementation per sharding library (``none``, ``ddp``, ``fsdp``, ``deepspeed``), each short and importing
its library lazily. The training loop only talks to this interface::

    strategy = make_strategy("fsdp", optimizer_factory=build_optimizer)  # encdec.distributed.make_strategy
    strategy.setup(model, optim, precision="bf16", grad_accum=2, activation_checkpointing=False)
    scheduler = build_scheduler(strategy.optimizer, ...)  # the loop owns the LR schedule
    for step in ...:
        for i, batch in enumerate(micro_batches):
            with strategy.no_sync(is_last_micro=i == grad_accum - 1), strategy.autocast():
                out = strategy.model(batch["image"])
                loss = loss_fn(out.output.float(), batch["mask"]) / (grad_accum * world_size)
            strategy.backward(loss)                        # already normalised: no strategy rescales it
        grad_norm = strategy.step(max_norm=optim.grad_clip)
        scheduler.step()
    strategy.save(ckpt_dir, extra={"step": step, "scheduler": scheduler.state_dict(), ...})

Contract details the loop relies on:

* ``setup`` moves the model to ``device``, applies activation checkpointing (before sharding), shards, and then
  builds the optimizer over the parameters that require grad (after sharding: FSDP2 parameters are DTensors).
  The optimizer comes from ``optimizer_factory(model, optim)`` with ``optim`` the recipe's typed ``optim``
  section (``encdec.config.OptimSection``; a plain mapping is validated into one); the loop passes
  ``encdec.train.optim.build_optimizer``. (A factory, not an import: this layer sits below ``encdec.train``.)
* ``precision`` is already resolved: ``bf16``, ``fp16`` or ``fp32`` (``auto`` is the loop's to resolve).
  Compute casting belongs to the strategy: wrap forward + loss in ``strategy.autocast()`` and do not add another
  autocast. Master weights and optimizer state stay fp32; fp16 loss scaling happens inside ``backward``/``step``.
* ``backward(loss)`` takes the already-normalised loss: its sum over the micro-batches of a step and over the
  ranks is the global-batch loss (the loop divides each part by the global normaliser, e.g. the number of valid
  pixels of the whole global batch). No strategy rescales it: DDP all-reduces with a summing comm hook, FSDP2
  reduce-scatters with divide factor 1 (as torchtitan does), DeepSpeed compensates its built-in 1/grad_accum and
  1/world averaging inside ``backward``. So the gradients are those of the global-batch loss, whatever the world
  size and accumulation.
* ``store_frozen_weights(model, precision)`` decides how frozen weights are stored for a precision (bf16 once
  under autocast for none/ddp; nothing where the library manages dtypes); the loop calls it after freezing.
* ``step`` returns the total gradient norm before clipping (``inf``/``nan`` when an fp16 step overflowed and was
  skipped), steps the optimizer and zeroes gradients.
* ``barrier()`` and ``broadcast_object`` are collective; on NCCL they name this rank's device.
* ``save(ckpt_dir, extra)`` is collective (every rank calls it). It writes into a temporary sibling directory and
  renames it to ``ckpt_dir`` when every rank has finished, so a half-written checkpoint never has the final name.
  ``extra`` is per-rank state (step, scheduler, RNG, data position); each rank's own ``extra`` is returned by
  ``load`` when the world size is unchanged, rank 0's otherwise. ``load`` restores model and optimizer state and
  accepts checkpoints written at another world size (and, for the DCP format, by another of none/ddp/fsdp).
* The loop builds the model inside ``build_context()``; on a rank where ``meta_build`` is True it skips the
  pretrained / ``init_from`` loads (the model is on the meta device) and ``setup`` materialises it from rank 0.
* ``full_state_dict()`` is collective; it returns the plain fp32 state dict (keys of the unwrapped model, CPU
  tensors) on rank 0 and ``None`` elsewhere.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from encdec.config.checks import check_int
from encdec.distributed.ckpt_io import atomic_checkpoint_dir, load_extra, read_meta_of_format, save_extra
from encdec.distributed.frozen_storage import compute_dtype
from encdec.distributed.process_group import DEFAULT_PG_TIMEOUT_S, barrier, default_device

if TYPE_CHECKING:
    from encdec.config import OptimSection

__all__ = ["PRECISIONS", "OptimizerFactory", "Strategy", "StrategyError", "as_optim_section"]

PRECISIONS = ("bf16", "fp16", "fp32")
"""Resolved precisions a strategy runs (the recipe's ``auto`` is resolved before set-up)."""

OptimizerFactory = Callable[[nn.Module, "OptimSection"], torch.optim.Optimizer]
"""Builds the optimizer over ``model``'s trainable parameters from the recipe's ``optim`` section."""


class StrategyError(ValueError):
    """A strategy was asked for something it cannot do (bad option, wrong call order)."""


def as_optim_section(optim: OptimSection | Mapping[str, Any]) -> OptimSection:
    """The typed ``optim`` section (a mapping is validated into one: same defaults and checks as a recipe's)."""
    from encdec.config import OptimSection  # pydantic: imported when a strategy is set up, not with the package

    return optim if isinstance(optim, OptimSection) else OptimSection.model_validate(dict(optim))


class Strategy(ABC):
    """How one rank holds, steps and checkpoints its part of the model.

    Args:
        optimizer_factory: builds the optimizer after sharding (the loop passes ``encdec.train.optim.build_optimizer``);
            required by ``setup``.
        adapter_only: checkpoints hold only trainable parameters (+ optimizer state): for PEFT runs whose frozen
            base is rebuilt from the pretrained weights on resume.
        device: device to train on; defaults to ``cuda:<LOCAL_RANK>`` when CUDA is available, else CPU.
        pg_timeout_s: collective timeout (``train.pg_timeout_s``) for a process group the strategy has to make
            itself (DeepSpeed in one process) and for DeepSpeed's communication backend.
    """

    name: str = "abstract"

    def __init__(
        self,
        *,
        optimizer_factory: OptimizerFactory | None = None,
        adapter_only: bool = False,
        device: str | torch.device | None = None,
        pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S,
    ) -> None:
        self.optimizer_factory = optimizer_factory
        self.adapter_only = bool(adapter_only)
        self.pg_timeout_s = float(pg_timeout_s)
        self._device = torch.device(device) if device is not None else default_device()
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.precision = "fp32"
        self.grad_accum = 1

    # ------------------------------------------------------------------ identity
    @property
    def rank(self) -> int:
        """This process's global rank (0 without a process group)."""
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        """Number of ranks (1 without a process group)."""
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def device(self) -> torch.device:
        """The device the model's compute runs on."""
        return self._device

    @property
    def model(self) -> nn.Module:
        """The wrapped model to call for forward (DDP wrapper, FSDP2 module, DeepSpeed engine or the module)."""
        if self._model is None:
            raise StrategyError(f"strategy {self.name!r}: call setup(model, ...) before using .model")
        return self._model

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (the object ``build_model`` returned, possibly sharded in place)."""
        return self.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over trainable parameters (build an LR scheduler on it)."""
        if self._optimizer is None:
            raise StrategyError(f"strategy {self.name!r}: call setup(model, ...) before using .optimizer")
        return self._optimizer

    # ------------------------------------------------------------------ building the model
    @property
    def meta_build(self) -> bool:
        """True when this rank builds the model on the meta device and loads no weights into it: ``setup`` then
        fills its shards from rank 0's model (FSDP2 ``build_on_rank0``). Default: every rank builds for real."""
        return False

    def build_context(self) -> contextlib.AbstractContextManager[Any]:
        """Context the loop builds the model in on this rank (before loading pretrained / ``init_from`` weights).

        Default: ``torch.device("meta")`` when :attr:`meta_build`, else nothing (a real build on the CPU). A
        strategy that partitions parameters as they are created (e.g. DeepSpeed's ``zero.Init``) returns its own
        context here; it must then also make the weight loading work on the partitioned model or set
        :attr:`meta_build` so that only ``setup`` fills the weights.
        """
        return torch.device("meta") if self.meta_build else contextlib.nullcontext()

    # ------------------------------------------------------------------ lifecycle
    @abstractmethod
    def setup(
        self,
        model: nn.Module,
        optim_cfg: OptimSection | Mapping[str, Any],
        *,
        precision: str,
        grad_accum: int,
        activation_checkpointing: bool,
    ) -> None:
        """Place and shard ``model``, then build the optimizer over its trainable parameters.

        Args:
            model: a materialised model (pretrained weights loaded, PEFT applied, trainable set decided).
            optim_cfg: the recipe's ``optim`` section (typed, or a mapping validated into one).
            precision: ``bf16``, ``fp16`` or ``fp32``.
            grad_accum: micro-batches per optimizer step.
            activation_checkpointing: recompute each sharding unit's activations in backward.
        """

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for forward + loss that applies this strategy's compute precision."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradients of ``loss``, already normalised for the global batch (see the module
        docstring): the strategy neither divides it by ``grad_accum`` nor averages it over ranks."""

    def store_frozen_weights(self, model: nn.Module, precision: str) -> dict[str, int]:
        """Store ``model``'s frozen weights as this strategy computes with them at ``precision`` (before
        ``setup``). Default: leave them as they are (the library manages parameter dtypes).

        Returns:
            What was changed (``{"frozen_cast": parameters moved, "adapters": adapter layers switched}``).
        """
        return {"frozen_cast": 0, "adapters": 0}

    @abstractmethod
    def no_sync(self, is_last_micro: bool) -> contextlib.AbstractContextManager[None]:
        """Context for a micro-batch's forward + backward; gradients are synchronised only when ``is_last_micro``."""

    @abstractmethod
    def step(self, max_norm: float | None) -> float:
        """Clip to ``max_norm`` (None: no clipping), step the optimizer, zero the gradients.

        Returns:
            The total gradient norm before clipping.
        """

    @abstractmethod
    def save(self, ckpt_dir: str | Path, extra: Mapping[str, Any]) -> None:
        """Write a checkpoint atomically to ``ckpt_dir`` (collective)."""

    @abstractmethod
    def load(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """Restore model and optimizer from ``ckpt_dir`` (collective); returns the saved ``extra``."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The plain, gathered fp32 state dict on rank 0; ``None`` on other ranks (collective)."""

    # ------------------------------------------------------------------ helpers shared by implementations
    def _checkpoint_meta(self, fmt: str, step: Any, **more: Any) -> dict[str, Any]:
        """What a checkpoint's ``meta.json`` records about the run that wrote it (read back by ``read_meta``)."""
        return {"format": fmt, "strategy": self.name, **more, "world_size": self.world_size,
                "adapter_only": self.adapter_only, "precision": self.precision, "step": step}

    @contextlib.contextmanager
    def _writing(self, ckpt_dir: str | Path, fmt: str, extra: Mapping[str, Any], **meta: Any) -> Iterator[Path]:
        """Collective: the atomic directory a ``save`` writes its ``state/`` into; this rank's ``extra`` and the
        ``meta.json`` (format ``fmt`` plus ``meta``) are written around it."""
        info = self._checkpoint_meta(fmt, extra.get("step"), **meta)
        with atomic_checkpoint_dir(ckpt_dir, rank=self.rank, barrier=self.barrier, meta=info) as tmp:
            yield tmp
            save_extra(tmp, self.rank, extra)

    def _read_checkpoint_meta(self, ckpt_dir: str | Path, fmt: str, readers: str) -> dict[str, Any]:
        """``meta.json`` of a checkpoint this strategy is about to load, checked to be in format ``fmt``."""
        return read_meta_of_format(ckpt_dir, fmt, reader=self.name, readers=readers)

    def _load_extra(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """This rank's saved ``extra`` (rank 0's when the world size changed)."""
        return load_extra(ckpt_dir, self.rank, self.world_size)

    def _check_setup_args(self, model: nn.Module, optim_cfg: OptimSection | Mapping[str, Any], precision: str,
                          grad_accum: int) -> OptimSection:
        """Check what ``setup`` was given; returns the typed ``optim`` section."""
        if self.optimizer_factory is None:
            raise StrategyError(
                f"strategy {self.name!r} has no optimizer_factory; pass one to make_strategy, e.g. "
                "make_strategy(name, optimizer_factory=encdec.train.optim.build_optimizer)"
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise StrategyError(
                "the model has no trainable parameters; check the PEFT config and the freezing options "
                "(freezing the backbone after PEFT also freezes its adapters)"
            )
        if precision not in PRECISIONS:
            raise StrategyError(
                f"precision {precision!r} is not supported by strategy {self.name!r}; use one of "
                f"{', '.join(PRECISIONS)} (resolve 'auto' with encdec.train.precision first)"
            )
        check_int(grad_accum, "grad_accum (optim.grad_accum)", error=StrategyError)
        self.precision = precision
        self.grad_accum = grad_accum
        return as_optim_section(optim_cfg)

    def _build_optimizer(self, model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
        factory = self.optimizer_factory
        if factory is None:  # _check_setup_args said so before any sharding; kept for the type checker
            raise StrategyError(f"strategy {self.name!r} has no optimizer_factory")
        return factory(model, optim)

    def _autocast_dtype(self) -> torch.dtype | None:
        return None if self.precision == "fp32" else compute_dtype(self.precision)

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group); on NCCL on this strategy's device."""
        barrier(self.device)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (collective; ``obj`` itself without a process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def trainable_names(self) -> Iterator[str]:
        """Names of the unwrapped model's trainable parameters."""
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                yield name
