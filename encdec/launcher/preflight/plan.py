"""The plan: everything that can be checked before a cluster is touched, and what the run will cost.

``make_plan`` validates registry names, builds the model on the meta device (no weights allocated), pushes a
dummy micro-batch's shape through it in training mode while recording the tensors autograd saves for backward,
counts parameters per part, and estimates per-worker memory for each strategy at the target world size::

    total = params + grads + optimizer states + activations (+ the runtime's own footprint)

Sizes per strategy (P parameters, T trainable, F = P - T frozen, W workers, U the largest sharding unit):

=========  ===========================================  ==============  ==============
strategy   parameters                                   gradients       optimizer
=========  ===========================================  ==============  ==============
none       4T + fF                                      4T              kT
ddp        4T + fF                                      4T + 4T bucket  kT
fsdp       (4T + 4F) / W + 2 U c (gathered, prefetch)   4T / W + 4U_T   kT / W
zero2      c P + 4T / W (fp32 master shard)             4T / W + bucket kT / W
zero3      c P / W + 4T / W + 2 U c (live params)       4T / W          kT / W
=========  ===========================================  ==============  ==============

with f the bytes of a frozen weight under none/ddp (2 in bf16: the engine stores frozen weights in bf16 once; else
4; FSDP2 keeps fp32 shards), c the compute bytes (2 for bf16/fp16, 4 for fp32; DeepSpeed keeps the model itself at
c) and k the optimizer state bytes per trainable parameter (8 for Adam/AdamW, 4 for SGD with momentum).
Activations never shard: they are the bytes of every distinct storage saved for backward (measured on the meta
device at the per-worker micro-batch); with activation checkpointing, only each unit's input is kept plus one
unit's activations during its recompute. The runtime term is a worker's footprint besides the model (torch, Ray,
gloo, rasterio/GDAL, the reader threads), measured. On CPU workers the parameters term is at least 4P: each rank
builds the whole model in fp32 before sharding or casting it, and the host allocator keeps that memory. Checked against measured peaks (tiny and 300M models at 2 CPU
workers) in tests/integration/test_launcher_run.py and the launcher's closing note.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from encdec.launcher.preflight.trace import ActivationTrace, count_parts, input_shape_of, trace_activations
from encdec.launcher.recipe.errors import RecipeIssue, did_you_mean

if TYPE_CHECKING:
    from torch import nn

    from encdec.launcher.recipe.schema import Recipe
    from encdec.models.peft import PartCount

__all__ = [
    "MEMORY_LAYOUTS",
    "ActivationTrace",
    "MemoryEstimate",
    "Plan",
    "build_meta_model",
    "check_names",
    "make_plan",
]

GiB = 1024**3
#: the rows of the memory table: how each strategy lays the model out (DeepSpeed split by ZeRO stage)
MEMORY_LAYOUTS = ("none", "ddp", "fsdp", "zero2", "zero3")
# A worker's footprint besides the model, measured on CPU with the quickstart (tests/integration/
# test_launcher_run.py): 0.66-0.90 GiB RSS when the worker function starts (torch, Ray, gloo), then ~0.33-0.40 GiB
# more once rasterio/GDAL, PEFT, the reader threads and gloo's buffers are in use (peak 0.99-1.30 GiB for a 4.5M
# parameter model). The start figure is mostly file-backed library pages (torch and the CUDA libraries its wheel
# loads): 0.24 GiB more of them are resident when those files are in the page cache (a fresh install, a busy
# node) than when they were evicted. 1.05 GiB sits between the two. On GPU: CUDA context and allocator slack.
RUNTIME_BYTES_CPU = int(1.05 * GiB)
RUNTIME_BYTES_GPU = int(0.6 * GiB)


@dataclass
class MemoryEstimate:
    """Per-worker memory of one strategy, in bytes."""

    strategy: str
    params: int
    grads: int
    optim: int
    activations: int
    activations_ckpt: int
    runtime: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim + self.activations + self.runtime

    @property
    def total_ckpt(self) -> int:
        return self.params + self.grads + self.optim + self.activations_ckpt + self.runtime


@dataclass
class Plan:
    """The result of planning a recipe at a world size."""

    world_size: int
    micro_batch: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    parts: dict[str, PartCount]
    estimates: list[MemoryEstimate]
    precision: str
    device: str
    device_memory: int | None
    chosen: str
    activation_checkpointing: bool
    recommended: str | None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    on_gpu: bool = False

    @property
    def total_params(self) -> int:
        return sum(p.total for p in self.parts.values())

    @property
    def trainable_params(self) -> int:
        return sum(p.trainable for p in self.parts.values())

    def estimate(self, strategy: str) -> MemoryEstimate:
        """The estimate for ``strategy`` (``ddp``, ``fsdp``, ``zero2``, ``zero3``, ``none``)."""
        return next(e for e in self.estimates if e.strategy == strategy)

    def chosen_total(self) -> int:
        """Estimated per-worker bytes of the recipe's own strategy and activation-checkpointing setting."""
        est = self.estimate(self.chosen)
        return est.total_ckpt if self.activation_checkpointing else est.total

    def fits(self, strategy: str, ckpt: bool = False) -> bool | None:
        """Whether ``strategy`` fits the device memory (None when the memory is unknown)."""
        if self.device_memory is None:
            return None
        est = self.estimate(strategy)
        return (est.total_ckpt if ckpt else est.total) <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form (``plan --json``)."""
        return {
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "parts": [{"name": n, "total": p.total, "trainable": p.trainable} for n, p in self.parts.items()],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "precision": self.precision,
            "device": self.device,
            "device_memory": self.device_memory,
            "chosen": self.chosen,
            "activation_checkpointing": self.activation_checkpointing,
            "chosen_total": self.chosen_total(),
            "recommended": self.recommended,
            "estimates": [
                {**vars(e), "total": e.total, "total_ckpt": e.total_ckpt, "fits": self.fits(e.strategy),
                 "fits_ckpt": self.fits(e.strategy, True)}
                for e in self.estimates
            ],
            "warnings": self.warnings,
            "seconds": self.seconds,
        }


# ----------------------------------------------------------------------------------------------- checks
def check_names(recipe: Recipe) -> list[RecipeIssue]:
    """Every registry name of the model section (backbone, decoder, necks, aux decoders) that does not exist."""
    from encdec.registry import BACKBONE_REGISTRY, DECODER_REGISTRY, NECK_REGISTRY

    issues = []

    def check(registry: Any, name: str, path: tuple[str | int, ...]) -> None:
        if name in registry:
            return
        sources = getattr(registry, "sources", None)
        if sources:  # MultiSourceRegistry: the built-in names, and how external sources are addressed
            builtin = list(next(iter(sources.values())).names())
            external = [p for p in sources if p != next(iter(sources))]
            try:
                candidates = registry.names()
            except Exception:  # an external library that fails to list must not hide the real problem
                candidates = builtin
            more = f"; or any {' / '.join(f'{p}_<name>' for p in external)}" if external else ""
        else:
            builtin = candidates = list(registry.names())
            more = ""
        hint = did_you_mean(name, candidates).strip()
        issues.append(RecipeIssue(path, f"{registry.kind} '{name}' is not registered", name,
                                  fix=(hint + " " if hint else "") + f"Built-in: {', '.join(builtin)}{more}"))

    m = recipe.model
    check(BACKBONE_REGISTRY, m.backbone, ("model", "backbone"))
    check(DECODER_REGISTRY, m.decoder, ("model", "decoder"))
    for i, neck in enumerate(m.necks or []):
        check(NECK_REGISTRY, neck.name, ("model", "necks", i, "name"))
    for i, aux in enumerate(m.aux_decoders or []):
        check(DECODER_REGISTRY, aux.decoder, ("model", "aux_decoders", i, "decoder"))
    return issues


def build_meta_model(recipe: Recipe) -> nn.Module:
    """Build the recipe's model on the meta device (no memory for weights). Errors become a RecipeError."""
    from encdec.train.build import build_run_model

    issues = check_names(recipe)
    if issues:
        raise recipe.error(issues)
    try:
        # plain LoRA is planned without importing peft (and transformers, ~4 s): see encdec.models.peft.standin
        # train=None: the plan counts as before (train.freeze_* not applied; the activation trace assumes the
        # encoder trains, the upper bound)
        return build_run_model(recipe.task, recipe.model.without_pretrained(), None, device="meta",
                               adapters="standin")
    except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as err:
        raise recipe.error([
            RecipeIssue(("model",), f"the model does not build: {type(err).__name__}: {err}", has_value=False,
                        fix="check the arguments named in the message against the component's signature")
        ]) from err


def _expected_output(recipe: Recipe, batch: int) -> tuple[int, ...] | None:
    n, s = recipe.model.num_classes, recipe.data.img_size
    if recipe.task == "segmentation" and recipe.model.rescale:
        return (batch, n or 0, s, s)
    if recipe.task == "classification":
        return (batch, n or 0)
    if recipe.task == "regression" and recipe.model.rescale:
        return (batch, s, s) if (n or 1) == 1 else (batch, n or 1, s, s)
    return None


# ----------------------------------------------------------------------------------------------- memory
def plan_precision(recipe: Recipe, on_gpu: bool) -> str:
    """The precision the workers will resolve (``encdec.config.resolve_precision``, the engine's own rule): on a
    GPU, bf16 unless this machine has a GPU without bf16 (the workers' GPUs are assumed to be like it).

    Raises:
        RecipeError: ``fp16`` for CPU workers (the engine refuses it there too).
    """
    from encdec.config import PrecisionError, resolve_precision

    gpu_bf16 = True
    if on_gpu:
        import torch

        gpu_bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    try:
        return resolve_precision(recipe.train.precision, "cuda" if on_gpu else "cpu", gpu_bf16=gpu_bf16)
    except PrecisionError as err:
        raise recipe.error([RecipeIssue(("train", "precision"), str(err), recipe.train.precision,
                                        fix="use bf16 or fp32 (or auto) on CPU workers, or give the workers GPUs")]) from None


def estimate_memory(
    *,
    total: int,
    trainable: int,
    unit_params: int,
    unit_trainable: int,
    world: int,
    act: int,
    act_ckpt: int,
    compute_bytes: int,
    frozen_bytes: int,
    optim_bytes: int,
    runtime: int,
) -> list[MemoryEstimate]:
    """Per-worker byte estimates for every strategy (formulas in the module docstring)."""
    frozen = total - trainable
    c, w = compute_bytes, world
    bucket = min(trainable, 25 * 2**20) * 4  # DDP's 25 MiB buckets / DeepSpeed's reduce bucket, at most T
    out = [
        MemoryEstimate("none", 4 * trainable + frozen_bytes * frozen, 4 * trainable, optim_bytes * trainable,
                       act, act_ckpt, runtime),
        MemoryEstimate("ddp", 4 * trainable + frozen_bytes * frozen, 4 * trainable + min(4 * trainable, bucket * 4),
                       optim_bytes * trainable, act, act_ckpt, runtime),
        MemoryEstimate("fsdp", (4 * trainable + 4 * frozen) // w + 2 * unit_params * c,
                       4 * trainable // w + 4 * unit_trainable, optim_bytes * trainable // w, act, act_ckpt, runtime),
    ]
    master = 4 * trainable // w if c < 4 else 0
    out.append(MemoryEstimate("zero2", c * total + master, 4 * trainable // w + bucket, optim_bytes * trainable // w,
                              act, act_ckpt, runtime))
    out.append(MemoryEstimate("zero3", c * total // w + master + 2 * unit_params * c, 4 * trainable // w,
                              optim_bytes * trainable // w, act, act_ckpt, runtime))
    return out


def _device_memory(recipe: Recipe, on_gpu: bool) -> tuple[int | None, str]:
    """Bytes available per worker and where that number came from."""
    c = recipe.cluster
    if c.device_memory_gb is not None:
        return int(c.device_memory_gb * GiB), f"{c.device_memory_gb:g} GiB per worker (cluster.device_memory_gb)"
    if on_gpu:
        try:
            import torch

            if torch.cuda.is_available():
                mem = torch.cuda.get_device_properties(0).total_memory
                return mem, f"{mem / GiB:.0f} GiB ({torch.cuda.get_device_name(0)}, this machine)"
        except Exception:  # no driver: fall through to "unknown"
            pass
        return None, "unknown (set cluster.device_memory_gb for the fit check)"
    import os

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None, "unknown (set cluster.device_memory_gb)"
    per = ram // c.workers_per_node
    return per, f"{per / GiB:.1f} GiB per worker (this machine's RAM / {c.workers_per_node} workers)"


def _on_gpu(recipe: Recipe) -> bool:
    """Whether the workers get GPUs (``gpus_per_worker: null`` = auto: judged by this machine for the plan)."""
    gpus = recipe.cluster.gpus_per_worker
    if gpus is not None:
        return gpus > 0
    import torch

    return bool(torch.cuda.is_available())


def strategy_key(recipe: Recipe) -> str:
    """The estimate row of the recipe's own strategy (``deepspeed`` -> ``zero2``/``zero3``)."""
    t = recipe.train
    return f"zero{t.zero_stage}" if t.strategy == "deepspeed" else t.strategy


def make_plan(recipe: Recipe) -> Plan:
    """Validate the recipe against the registries, build on meta, trace a dummy batch and estimate memory.

    Raises:
        RecipeError: unknown names, a model that does not build, or an output of the wrong shape.
    """
    start = time.perf_counter()
    world = recipe.cluster.world_size
    micro = max(1, recipe.data.global_batch_size // (world * recipe.optim.grad_accum))
    model = build_meta_model(recipe)
    parts = count_parts(model)
    units: list[nn.Module] = list(model.sharding_units()) if hasattr(model, "sharding_units") else []  # type: ignore[operator]
    shape = input_shape_of(recipe, micro)
    try:
        trace = trace_activations(model, shape, units)
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
        if "more than 1 value per channel" in str(err):
            raise recipe.error([
                RecipeIssue(("data", "global_batch_size"), f"gives each worker a micro-batch of {micro}, and a "
                            f"BatchNorm of the model (e.g. UperNet's 1x1 pooling branch) needs more than one value "
                            f"per channel in training", recipe.data.global_batch_size,
                            fix=f"use at least {2 * world * recipe.optim.grad_accum} (2 per worker per micro-step), "
                            "or a decoder norm without batch statistics (decoder_norm: group)")
            ]) from err
        raise recipe.error([
            RecipeIssue(("model",), f"a dummy batch of shape {list(shape)} does not go through the model: "
                        f"{type(err).__name__}: {err}", has_value=False,
                        fix="check data.bands/img_size/num_frames against the backbone, and the neck/decoder chain")
        ]) from err
    expected = _expected_output(recipe, micro)
    if expected is not None and trace.output_shape != expected:
        raise recipe.error([
            RecipeIssue(("model",), f"the model outputs {list(trace.output_shape)} for a batch {list(shape)} but "
                        f"task '{recipe.task}' needs {list(expected)}", has_value=False,
                        fix="check num_classes, the decoder/head and rescale")
        ])

    on_gpu = _on_gpu(recipe)
    precision = plan_precision(recipe, on_gpu)
    c = 2 if precision in ("bf16", "fp16") else 4
    # Saved float activations shrink to the compute dtype under mixed precision; index tensors do not.
    act = int(trace.total * (trace.float_fraction * c / 4 + (1 - trace.float_fraction)))
    scale = act / trace.total if trace.total else 1.0
    per_unit = [int(u * scale) for u in trace.per_unit]
    inputs = [int(i * scale) for i in trace.unit_inputs]
    act_ckpt = act - sum(per_unit) + sum(inputs) + (max(per_unit) if per_unit else 0)
    total = sum(p.total for p in parts.values())
    trainable = sum(p.trainable for p in parts.values())
    unit_sizes = [(sum(p.numel() for p in u.parameters()), sum(p.numel() for p in u.parameters() if p.requires_grad))
                  for u in units] or [(0, 0)]
    unit_params, unit_trainable = max(unit_sizes)
    estimates = estimate_memory(
        total=total, trainable=trainable, unit_params=unit_params, unit_trainable=unit_trainable, world=world,
        # the engine stores frozen weights at bf16 once under none/ddp (FSDP2 keeps fp32 shards, casts per unit)
        act=act, act_ckpt=act_ckpt, compute_bytes=c, frozen_bytes=2 if precision == "bf16" else 4,
        optim_bytes=4 if recipe.optim.name == "sgd" else 8,
        runtime=RUNTIME_BYTES_GPU if on_gpu else RUNTIME_BYTES_CPU,
    )
    if not on_gpu:
        # CPU workers: every rank builds the whole model in fp32 before sharding/casting it, and the host
        # allocator keeps that memory (measured: FSDP's RSS peak holds the full fp32 build, not just its shard).
        for e in estimates:
            e.params = max(e.params, 4 * total)
    if world > 1:
        estimates = [e for e in estimates if e.strategy != "none"]
    device_memory, device = _device_memory(recipe, on_gpu)
    chosen = strategy_key(recipe)
    plan = Plan(world, micro, shape, trace.output_shape, parts, estimates, precision, device, device_memory, chosen,
                recipe.train.activation_checkpointing, None)
    plan.on_gpu = on_gpu
    plan.recommended = _recommend(plan)
    if plan.fits(chosen, recipe.train.activation_checkpointing) is False:
        plan.warnings.append(
            f"train.strategy {recipe.train.strategy}"
            f"{' (ZeRO-' + str(recipe.train.zero_stage) + ')' if chosen.startswith('zero') else ''} needs "
            f"~{plan.chosen_total() / GiB:.1f} GiB per worker but {device_memory / GiB:.1f} GiB is available"  # type: ignore[operator]
            + (f"; use {plan.recommended}" if plan.recommended else "; no strategy fits: add nodes or shrink the batch")
        )
    if precision == "fp16" and not on_gpu:
        plan.warnings.append("train.precision fp16 on CPU is slow and needs loss scaling; use bf16 or fp32")
    if recipe.data.global_batch_size < world * recipe.optim.grad_accum:
        plan.warnings.append("data.global_batch_size is smaller than workers x grad_accum")
    plan.seconds = time.perf_counter() - start
    return plan


def _recommend(plan: Plan) -> str | None:
    """The least-communication setting that fits: ddp < fsdp < zero2 < zero3, activation checkpointing last.

    Settings with 10% headroom are preferred; one that fits only without headroom is named as tight.
    """
    if plan.device_memory is None:
        return None
    order = [(name, ckpt) for ckpt in (False, True) for name in ("none", "ddp", "fsdp", "zero2", "zero3")
             if any(e.strategy == name for e in plan.estimates)]

    def need(name: str, ckpt: bool) -> int:
        est = plan.estimate(name)
        return est.total_ckpt if ckpt else est.total

    def label(name: str, ckpt: bool) -> str:
        text = {"zero2": "deepspeed (zero_stage 2)", "zero3": "deepspeed (zero_stage 3)"}.get(name, name)
        return text + (" + activation_checkpointing" if ckpt else "")

    for name, ckpt in order:
        if need(name, ckpt) * 1.1 <= plan.device_memory:
            return label(name, ckpt)
    for name, ckpt in order:
        if need(name, ckpt) <= plan.device_memory:
            return label(name, ckpt) + " (tight: under 10% headroom)"
    return None
