"""The sections the engine runs from: ``run:``, ``loss:``, ``optim:`` and ``train:``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from encdec.config.base import Section
from encdec.config.early_stop import EarlyStopConfig
from encdec.config.names import BEST_DEFAULTS, LossName, PrecisionName, StrategyName
from encdec.config.plateau import PlateauConfig

__all__ = ["LossSection", "OptimSection", "RunSection", "TrainSection"]


class RunSection(Section):
    """Identity of the run."""

    name: str = Field(
        "run",
        description="Run name; every launch makes a new run directory <cluster.storage>/<name>-<timestamp>.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
    )
    seed: int = Field(0, description="Seed for model init, data order and augmentation (same seed, same run).")
    init_from: str | None = Field(
        None,
        description="Start from a TerraTorch fine-tuned checkpoint (.ckpt whose state dict is under 'model.') or a "
        "state dict file; `--init-from FILE` sets it.",
    )
    export: bool = Field(
        True, description="At the end, write the consolidated model (LoRA merged, safetensors) into the run dir."
    )


class LossSection(Section):
    """The training loss (``encdec.train.losses``)."""

    name: LossName | None = Field(
        None,
        description="segmentation: ce | dice | ce_dice; classification: ce; regression: mse | l1 (mae) | huber. "
        "Default: ce for segmentation/classification, mse for regression.",
    )
    ignore_index: int | None = Field(
        None,
        description="Target value skipped by loss and metrics (nodata). Default -1 for segmentation/classification, "
        "none for regression (where -1 is a valid value).",
    )
    class_weights: list[float] | None = Field(None, description="Per-class cross-entropy weights (length num_classes).")
    dice_weight: float | None = Field(None, ge=0, description="Weight of the Dice term in ce_dice (default 1.0).")
    dice_smooth: float | None = Field(None, gt=0, description="Dice smoothing constant (default 1.0).")
    huber_delta: float | None = Field(None, gt=0, description="Huber loss delta (default 1.0).")
    aux_weights: dict[str, float] | None = Field(
        None, description="Loss weight per auxiliary head name (heads not listed weigh 1.0)."
    )

    def name_for(self, task: str) -> str:
        """The loss of ``task``: ``name``, else ce for segmentation/classification and mse for regression."""
        if self.name is not None:
            return self.name
        return "ce" if task in ("segmentation", "classification") else "mse"

    def ignore_index_for(self, task: str) -> int | None:
        """``ignore_index``, else -1 for segmentation/classification and none for regression (where -1 is a
        valid value)."""
        if self.ignore_index is not None:
            return self.ignore_index
        return -1 if task in ("segmentation", "classification") else None


class OptimSection(Section):
    """Optimizer, learning-rate schedule, clipping and gradient accumulation (``encdec.train.optim``)."""

    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer (over trainable parameters only).")
    lr: float = Field(1e-4, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="Decoupled weight decay (adamw) / L2 (sgd).")
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="AdamW betas (decay rates of the gradient mean and square), each in [0, 1)."
    )
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon (added to the root of the second moment).")
    fused: bool = Field(
        True, description="AdamW: one fused kernel per step instead of ~10 passes (CPU and CUDA, also on FSDP2 "
        "shards); false = the for-each implementation."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="SGD Nesterov momentum (needs momentum > 0).")
    schedule: Literal["cosine", "constant", "plateau"] = Field(
        "cosine", description="LR after warmup: cosine decay, constant, or plateau (lowered by optim.plateau.factor "
        "when a validation metric stops improving).")
    plateau: PlateauConfig | None = Field(
        None, description="schedule plateau: metric, mode, factor, patience, threshold, threshold_mode, cooldown "
        "(torch's ReduceLROnPlateau, counted in validations; torch's defaults when the schedule is plateau).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to lr.")
    min_lr: float = Field(0.0, ge=0, description="Floor of the cosine and plateau schedules (at most lr).")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null = off.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step.")

    @model_validator(mode="after")
    def _plateau_defaults(self) -> OptimSection:
        # schedule plateau without a plateau block runs torch's defaults, written out so the resolved recipe shows
        # them; set through __dict__ because an assignment would validate (and so call this) again
        if self.schedule == "plateau" and self.plateau is None:
            self.__dict__["plateau"] = PlateauConfig.model_validate({})
        return self

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        from pydantic_core import PydanticCustomError

        if not all(0.0 <= b < 1.0 for b in v):
            raise PydanticCustomError("betas_range", "each beta must be in [0, 1) (e.g. [0.9, 0.999])", {})
        return v


class TrainSection(Section):
    """Length, precision, sharding strategy, intervals and fault tolerance."""

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run (give this or epochs).")
    epochs: int | None = Field(None, ge=1, description="Epochs over data.train (give this or max_steps).")
    precision: PrecisionName = Field(
        "auto", description="auto = bf16 where the hardware has it, else fp32; fp32 master weights always."
    )
    strategy: StrategyName = Field(
        "ddp", description="none (one process), ddp, fsdp (FSDP2 per transformer block) or deepspeed (ZeRO)."
    )
    zero_stage: Literal[2, 3] = Field(3, description="DeepSpeed ZeRO stage (strategy deepspeed only).")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward.")
    compile: bool = Field(False, description="torch.compile the model before sharding.")
    log_every: int = Field(10, ge=1, description="Report metrics every this many steps.")
    val_every: int = Field(500, ge=1, description="Validate every this many steps (and at the end).")
    ckpt_every: int = Field(500, ge=1, description="Checkpoint every this many steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept (the best by val metric is kept besides).")
    best_metric: str | None = Field(
        None, description="Validation metric whose best checkpoint is kept (default: val/mIoU, val/accuracy or "
        "val/rmse by task)."
    )
    best_mode: Literal["max", "min"] | None = Field(None, description="Whether best_metric is maximised or minimised.")
    freeze_backbone: bool = Field(False, description="Freeze the encoder (PEFT adapters stay trainable).")
    freeze_decoder: bool = Field(False, description="Freeze the decoder.")
    adapter_only: bool | None = Field(
        None, description="Checkpoints hold only trainable parameters (default: true for PEFT runs)."
    )
    reshard_after_forward: bool = Field(True, description="FSDP: free gathered weights after each unit's forward.")
    build_on_rank0: bool = Field(
        True, description="FSDP: rank 0 builds the model and loads its weights; the other ranks build it on the meta "
        "device and receive their shards from rank 0 (least host memory per rank)."
    )
    pg_timeout_s: int = Field(
        1800, ge=10, le=86400,
        description="Seconds a collective (all-reduce, all-gather, barrier) may wait before the process group "
        "fails the run (torch.distributed's timeout). Raise it when ZeRO-3/FSDP all-gathers of very large models "
        "or slow first steps time out."
    )
    early_stop: EarlyStopConfig | None = Field(
        None, description="Stop when a validation metric stops improving (metric, mode, patience, min_delta).")
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts from the last checkpoint before the run fails (-1 = always)."
    )

    @model_validator(mode="after")
    def _length(self) -> TrainSection:
        from pydantic_core import PydanticCustomError

        if (self.max_steps is None) == (self.epochs is None):
            raise PydanticCustomError(
                "train_length", "give exactly one of train.max_steps or train.epochs", {"sub": "max_steps"}
            )
        return self

    def best_metric_for(self, task: str) -> str:
        """The validation metric that picks the best checkpoint."""
        return self.best_metric or BEST_DEFAULTS[task][0]

    def best_mode_for(self, task: str) -> Literal["max", "min"]:
        """``max`` or ``min`` for :meth:`best_metric_for` (errors and losses are minimised)."""
        if self.best_mode is not None:
            return self.best_mode
        metric = self.best_metric_for(task)
        return "min" if any(word in metric for word in ("loss", "rmse", "mae")) else "max"
