"""The recipe: one YAML file describing a fine-tuning run, validated by pydantic v2 with ``extra="forbid"``.

Section names are the shared contract of ``shared/RECIPE.md``; the data, engine and Slurm code read them as plain
dicts (``Recipe.section(name)``), never this module. ``task`` sits beside ``model`` as in TerraTorch, and
``model`` is exactly ``build_model``'s keyword arguments so a TerraTorch ``model_args`` block pastes in unchanged.

Loading (``load_recipe``) collects every problem - YAML syntax, unknown keys, bad values, ``--set`` overrides,
cross-field rules - into one :class:`~encdec.launcher.errors.RecipeError`. Registry names and the model build are
checked later by the planner (they need torch). Nothing here imports torch.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from encdec.config.early_stop import EarlyStopConfig  # issue 16 hook
from encdec.config.track import TrackConfig  # issue 16 hook
from encdec.config.tune import TuneConfig  # issue 16 hook

__all__ = [
    "ClusterSection",
    "DataSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "Recipe",
    "RunSection",
    "SlurmSection",
    "TrainSection",
    "load_recipe",
    "recipe_from_dict",
]

TASKS = ("segmentation", "regression", "classification", "scalar_regression")
HLS_BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
MODEL_PREFIXES = ("backbone_", "decoder_", "head_")


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# --------------------------------------------------------------------------------------------- run
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


# --------------------------------------------------------------------------------------------- model
class NeckSpec(BaseModel):
    """One neck: ``{name: SelectIndices, indices: [5, 11, 17, 23]}``; keys besides ``name`` are its arguments."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Neck name in NECK_REGISTRY (e.g. SelectIndices, ReshapeTokensToImage).")


class AuxDecoderSpec(Section):
    """An auxiliary decoder + head on the same necked features (TerraTorch's AuxiliaryHead)."""

    name: str = Field(description="Unique name of the auxiliary head (its loss/metrics are reported under it).")
    decoder: str = Field(description="Decoder name in DECODER_REGISTRY.")
    decoder_args: dict[str, Any] | None = Field(
        None, description="Decoder arguments; head_* keys go to its own head."
    )


class PeftSection(Section):
    """PEFT on the backbone, applied after the fused-qkv split."""

    method: Literal["LORA"] = Field("LORA", description="PEFT method (peft's PeftType name); LORA is supported.")
    replace_qkv: str | None = Field(
        None,
        description="Substring naming fused qkv Linear(D, 3D) modules to split into q_linear/k_linear/v_linear "
        "before PEFT ('qkv' for Prithvi), so LoRA can target q and v alone.",
    )
    peft_config_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Arguments of peft's LoraConfig: target_modules, r, lora_alpha, lora_dropout, ...",
    )


class ModelSection(BaseModel):
    """Exactly ``build_model``'s keyword arguments (a TerraTorch ``model_args`` block pastes in unchanged).

    Besides the named fields, keys prefixed ``backbone_``, ``decoder_`` or ``head_`` are routed to that part with
    the prefix stripped, e.g. ``backbone_pretrained``, ``backbone_ckpt_path``, ``backbone_bands``,
    ``backbone_num_frames``, ``decoder_channels``, ``head_dropout``. Any other key is an error.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    backbone: str = Field(description="Backbone name: prithvi_eo_v2_300, prithvi_eo_tiny, timm_resnet18, ...")
    decoder: str = Field("FCNDecoder", description="Decoder name: UperNetDecoder, FCNDecoder, UNetDecoder, smp_Unet, ...")
    backbone_kwargs: dict[str, Any] | None = Field(None, description="Backbone constructor arguments.")
    decoder_kwargs: dict[str, Any] | None = Field(None, description="Decoder constructor arguments.")
    head_kwargs: dict[str, Any] | None = Field(None, description="Head constructor arguments (dropout, ...).")
    num_classes: int | None = Field(
        None, ge=1, description="Classes (segmentation/classification) or outputs (regression)."
    )
    necks: list[NeckSpec] | None = Field(None, description="Necks applied in order between encoder and decoder.")
    aux_decoders: list[AuxDecoderSpec] | None = Field(None, description="Auxiliary decoders + heads.")
    rescale: bool = Field(True, description="Interpolate pixel-wise outputs to the input size.")
    peft_config: PeftSection | None = Field(None, description="PEFT (LoRA) on the backbone; null = full fine-tune.")

    @model_validator(mode="after")
    def _prefixed_extras(self) -> ModelSection:
        from pydantic_core import PydanticCustomError

        for key in self.model_extra or {}:
            if not key.startswith(MODEL_PREFIXES):
                raise PydanticCustomError(
                    "model_key",
                    "'{key}' is not a build_model argument",
                    {"key": key, "fields": sorted(type(self).model_fields)},
                )
        return self

    def factory_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``build_model(task, **kwargs)`` (unset optional fields left out)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="python")
            elif isinstance(value, list):
                value = [v.model_dump(mode="python") if isinstance(v, BaseModel) else v for v in value]
            out[name] = copy.deepcopy(value)
        out.update(copy.deepcopy(dict(self.model_extra or {})))
        return out

    def backbone_arg(self, key: str, default: Any = None) -> Any:
        """A backbone argument given either as ``backbone_<key>`` or in ``backbone_kwargs``."""
        extra = self.model_extra or {}
        if f"backbone_{key}" in extra:
            return extra[f"backbone_{key}"]
        return (self.backbone_kwargs or {}).get(key, default)


# --------------------------------------------------------------------------------------------- loss
class LossSection(Section):
    """The training loss (``encdec.train.losses``)."""

    name: Literal["ce", "dice", "ce_dice", "mse", "l1", "mae", "huber"] | None = Field(
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


# --------------------------------------------------------------------------------------------- data
class SyntheticSpec(Section):
    """Synthetic HLS-like tiles the launcher writes into ``tiles`` when that folder has none (demo, CI)."""

    n_tiles: int = Field(ge=1, le=100000, description="Tiles to write.")
    seed: int = Field(0, description="Seed of the scenes (use different seeds for train and val: disjoint scenes).")
    task: Literal["flood", "landcover"] = Field("flood", description="Mask kind: flood (water, 2 classes) or "
                                                "landcover (5 classes).")


class DataSource(Section):
    """Where one split's samples come from: tile pairs, a manifest, or large scenes to chip."""

    tiles: str | list[str] | None = Field(
        None, description="Folder(s) or glob(s) of image tiles; masks are paired by image_suffix -> mask_suffix."
    )
    manifest: str | None = Field(
        None, description="CSV/Parquet listing image, mask (or label), optional split, time, lat, lon."
    )
    scenes: str | list[str] | None = Field(
        None, description="Folder(s) or glob(s) of large scenes chipped into img_size windows (windowed reads)."
    )
    stride: int | None = Field(None, ge=1, description="Chip stride in pixels for scenes (default img_size).")
    image_suffix: str = Field("_img.tif", description="File-name ending of image files in a tile folder.")
    mask_suffix: str | None = Field("_mask.tif", description="File-name ending of the paired masks (null: none).")
    split: str | None = Field(None, description="Manifest rows whose 'split' column equals this (default: split name).")
    synthetic: SyntheticSpec | None = Field(
        None, description="Write synthetic tiles into `tiles` (a folder) before the run when it has none."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        from pydantic_core import PydanticCustomError

        if sum(bool(v) for v in (self.tiles, self.manifest, self.scenes)) != 1:
            raise PydanticCustomError("data_source", "give exactly one of 'tiles', 'manifest' or 'scenes'", {})
        if self.synthetic is not None and not isinstance(self.tiles, str):
            raise PydanticCustomError("data_source", "'synthetic' needs 'tiles' to be one folder to write into", {})
        return self

    def plain(self) -> dict[str, Any]:
        """The split as the data package reads it (unset optional keys left out)."""
        out = self.model_dump(mode="python", exclude={"synthetic"})
        return {k: v for k, v in out.items() if v is not None or k == "mask_suffix"}


class AugmentSection(Section):
    """Training augmentations, applied identically to image and mask on the worker."""

    hflip: bool = Field(False, description="Random horizontal flips.")
    vflip: bool = Field(False, description="Random vertical flips.")
    rot90: bool = Field(False, description="Random 90-degree rotations.")
    random_crop: bool = Field(False, description="Random crops (then resized back to img_size).")


class ReaderSection(Section):
    """The per-rank prefetching reader (the default feed)."""

    threads: int = Field(4, ge=1, le=64, description="Decode threads per worker.")
    prefetch_batches: int = Field(2, ge=1, le=64, description="Micro-batches read ahead (bounds memory).")
    ray_cpus_per_task: float = Field(0.5, gt=0, description="CPUs per decode task (feed ray_data).")
    ray_prefetch_batches: int = Field(2, ge=1, description="Batches prefetched per worker (feed ray_data).")


class DataSection(Section):
    """The data: sources, bands, statistics, tile size, global batch and augmentation."""

    train: DataSource = Field(description="Training samples.")
    val: DataSource | None = Field(None, description="Held-out samples for validation (one pass, no augmentation).")
    test: DataSource | None = Field(None, description="Test samples (evaluated by `encdec-launch export --eval`).")
    bands: list[str | int] = Field(
        default_factory=lambda: list[str | int](HLS_BANDS),
        min_length=1,
        description="Bands to read, by name (band description, e.g. BLUE) or 0-based index, in the model's order.",
    )
    means: list[float] | None = Field(
        None, description="Per-band means for normalisation (default: Prithvi HLS statistics for HLS band names)."
    )
    stds: list[float] | None = Field(None, description="Per-band standard deviations (same length as bands).")
    img_size: int = Field(224, ge=8, le=8192, description="Tile size in pixels the model sees.")
    num_frames: int = Field(1, ge=1, description="Time steps per sample; >1 gives [C, T, H, W] inputs.")
    global_batch_size: int = Field(
        description="Samples per optimizer step over all workers; fixed across restarts. Per-worker micro-batch = "
        "global_batch_size / (workers x optim.grad_accum).",
        ge=1,
    )
    augment: AugmentSection = Field(default_factory=AugmentSection, description="Training augmentations.")  # type: ignore[arg-type]
    max_bad_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="Fail the run when more than this fraction of tiles is unreadable/bad."
    )
    reader: ReaderSection = Field(default_factory=ReaderSection, description="Per-rank reader settings.")  # type: ignore[arg-type]
    location_coords: bool = Field(
        False, description="Pass each tile's centre (lat, lon) to encoders that take it (Prithvi _tl)."
    )
    feed: Literal["reader", "ray"] = Field(
        "reader",
        description="reader: exact per-rank prefetching reader (default); ray: decode with Ray Data on the "
        "cluster's CPUs (see encdec.data for its exactness).",
    )

    @model_validator(mode="after")
    def _stats_match_bands(self) -> DataSection:
        from pydantic_core import PydanticCustomError

        for key in ("means", "stds"):
            value = getattr(self, key)
            if value is not None and len(value) != len(self.bands):
                raise PydanticCustomError(
                    "stats_length",
                    "data.{key} has {n} values but data.bands has {b}",
                    {"key": key, "n": len(value), "b": len(self.bands), "sub": key},
                )
        if self.stds is not None and any(s <= 0 for s in self.stds):
            raise PydanticCustomError("stds_positive", "data.stds must all be > 0", {"sub": "stds"})
        return self


# --------------------------------------------------------------------------------------------- optim
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
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR after warmup: cosine decay or constant.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to lr.")
    min_lr: float = Field(0.0, ge=0, description="Floor of the cosine schedule (at most lr).")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null = off.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step.")

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        from pydantic_core import PydanticCustomError

        if not all(0.0 <= b < 1.0 for b in v):
            raise PydanticCustomError("betas_range", "each beta must be in [0, 1) (e.g. [0.9, 0.999])", {})
        return v


# --------------------------------------------------------------------------------------------- train
class TrainSection(Section):
    """Length, precision, sharding strategy, intervals and fault tolerance."""

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run (give this or epochs).")
    epochs: int | None = Field(None, ge=1, description="Epochs over data.train (give this or max_steps).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 where the hardware has it, else fp32; fp32 master weights always."
    )
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
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
    early_stop: EarlyStopConfig | None = Field(  # issue 16 hook
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


# --------------------------------------------------------------------------------------------- cluster
class SlurmSection(Section):
    """``#SBATCH`` settings used with ``--slurm`` (CLI flags override them)."""

    partition: str | None = Field(None, description="Slurm partition (-p).")
    account: str | None = Field(None, description="Slurm account (-A).")
    time: str | None = Field("24:00:00", description="Time limit (HH:MM:SS or D-HH:MM:SS).")
    qos: str | None = Field(None, description="Quality of service.")
    constraint: str | None = Field(None, description="Node features (-C).")
    signal_grace_s: int = Field(
        120, ge=10, description="Seconds before the time limit at which USR1 asks the run to checkpoint and requeue."
    )
    requeue: bool = Field(True, description="Requeue the job after preemption/time limit and resume.")
    extra: list[str] = Field(default_factory=list, description="Extra '#SBATCH ...' lines passed through verbatim.")


class ClusterSection(Section):
    """Where and how wide the run goes."""

    nodes: int = Field(1, ge=1, le=4096, description="Nodes (machines); `--nodes N` overrides.")
    workers_per_node: int = Field(1, ge=1, le=64, description="Training workers per node (usually GPUs per node).")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="Ray CPUs per worker; leave CPU over for the data feed (0.5 on a 2-core laptop)."
    )
    gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs per worker; 0 = CPU training; null = 1 when the cluster has a GPU per worker, "
        "else 0 (decided at launch, recorded in the run's recipe)."
    )
    device_memory_gb: float | None = Field(
        None, gt=0, description="Memory per worker for the plan's fit check (GPU memory, or RAM share on CPU); "
        "null = detect on this machine."
    )
    storage: str = Field(
        "runs", description="Run storage root; must be reachable from every node (shared FS) when nodes > 1."
    )
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime_env for --address/--submit (working_dir, pip, env_vars)."
    )
    malloc_mmap_threshold: int | None = Field(
        131072, ge=0, le=33554432,
        description="CPU workers start with MALLOC_MMAP_THRESHOLD_=this (bytes): glibc then serves larger blocks "
        "with mmap and returns them to the OS when freed, instead of raising the threshold and keeping freed heap "
        "(FSDP2 full fine-tune on CPU: 0.56x DDP's peak memory with it, 0.73x without; benchmarks/README.md). "
        "null = glibc's default. A value in runtime_env.env_vars or the launching shell wins. GPU workers: unset.",
    )
    slurm: SlurmSection = Field(default_factory=SlurmSection, description="Slurm settings for --slurm.")  # type: ignore[arg-type]

    @property
    def world_size(self) -> int:
        """Total training workers."""
        return self.nodes * self.workers_per_node


# --------------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    """A fine-tuning run: task + model (factory kwargs) + loss + data + optim + train + cluster."""

    task: Literal["segmentation", "regression", "classification", "scalar_regression"] = Field(
        description="segmentation | regression (pixel-wise) | classification | scalar_regression."
    )
    run: RunSection = Field(default_factory=RunSection, description="Run identity (name, seed, init, export).")  # type: ignore[arg-type]
    model: ModelSection = Field(description="build_model's keyword arguments (TerraTorch model_args).")
    loss: LossSection = Field(default_factory=LossSection, description="The loss.")  # type: ignore[arg-type]
    data: DataSection = Field(description="Data sources, bands, statistics, batch and augmentation.")
    optim: OptimSection = Field(default_factory=OptimSection, description="Optimizer and schedule.")  # type: ignore[arg-type]
    train: TrainSection = Field(description="Length, precision, strategy, intervals, fault tolerance.")
    cluster: ClusterSection = Field(default_factory=ClusterSection, description="Nodes, workers, resources, storage.")  # type: ignore[arg-type]
    track: TrackConfig | None = Field(None, description="Experiment tracking: TensorBoard, MLflow, W&B.")  # issue 16 hook
    tune: TuneConfig | None = Field(None, description="Hyperparameter search (encdec-launch tune).")  # issue 16 hook
    # where each key was written (file line or --set), so later checks (registry names, the build) can say it too
    _origin: Any = PrivateAttr(default=None)

    def error(self, issues: list[Any]) -> Any:
        """A RecipeError for ``issues`` found after loading, with the lines/sources of the recipe file."""
        from encdec.launcher.errors import RecipeError

        lines, source = self._origin if self._origin else (None, None)
        return RecipeError(lines.attach(issues) if lines is not None else issues, source)

    @field_validator("task", mode="before")
    @classmethod
    def _task_lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    def section(self, name: str) -> dict[str, Any]:
        """One section as a plain dict (what the engine/data/Slurm code take; they never see this class).

        Unset optional keys are left out so each component applies its own documented default.
        """
        if name == "model":
            return self.model.factory_kwargs()
        if name == "data":
            out = self.data.model_dump(mode="python", exclude={"train", "val", "test"})
            for split in ("train", "val", "test"):
                source = getattr(self.data, split)
                if source is not None:
                    out[split] = source.plain()
            return {k: v for k, v in out.items() if v is not None}
        value = getattr(self, name)
        dumped = value.model_dump(mode="python")
        if name in ("loss", "train"):
            dumped = {k: v for k, v in dumped.items() if v is not None}
        if name == "optim":
            dumped["betas"] = list(dumped["betas"])
        return dumped

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved recipe as YAML-ready data (written into each run directory)."""
        out = self.model_dump(mode="json", exclude={"model"})
        out["model"] = _jsonable(self.model.factory_kwargs())
        order = ["task", "run", "model", "loss", "data", "optim", "train", "cluster"]
        extra = [k for k in ("track", "tune") if out.get(k) is not None]  # issue 16 hook: optional sections when set
        return {k: out[k] for k in order + extra}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- entry points
def load_recipe(path: str | Path, overrides: Sequence[str] = (), *, flags: Mapping[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe (see ``encdec.launcher.validate.load_recipe``).

    Raises:
        RecipeError: every problem found, each with its YAML path, line or ``--set`` source, value and fix.
    """
    from encdec.launcher.validate import load_recipe as _load

    return _load(path, overrides, flags=flags)


def recipe_from_dict(data: Any, *, source: str | None = None) -> Recipe:
    """Validate plain data as a recipe (every problem collected into one RecipeError)."""
    from encdec.launcher.validate import recipe_from_dict as _from_dict

    return _from_dict(data, source=source)


def json_schema() -> dict[str, Any]:
    """The recipe's JSON schema (``encdec-launch recipe --schema``)."""
    return Recipe.model_json_schema()


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """A string usable in file and Ray run names."""
    return _SAFE.sub("-", name).strip("-") or "run"
