"""Printing a plan: parameter table, per-strategy memory table with fit flags, and what would be launched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from encdec.launcher.preflight.plan import GiB, Plan

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["render_launch", "render_plan"]

_LABELS = {"none": "none", "ddp": "ddp", "fsdp": "fsdp", "zero2": "zero2", "zero3": "zero3"}
_LONG = {"none": "none (1 process)", "ddp": "ddp", "fsdp": "fsdp (FSDP2)", "zero2": "deepspeed ZeRO-2",
         "zero3": "deepspeed ZeRO-3"}


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def render_plan(plan: Plan, console: Console, title: str = "") -> None:
    """Print the parameter and memory tables of ``plan``."""
    from rich.table import Table

    params = Table(title=f"{title} parameters".strip(), title_justify="left")
    params.add_column("part")
    params.add_column("total", justify="right")
    params.add_column("trainable", justify="right")
    for name, p in plan.parts.items():
        params.add_row(name, _count(p.total), _count(p.trainable))
    params.add_row("[bold]all", f"[bold]{_count(plan.total_params)}", f"[bold]{_count(plan.trainable_params)}")
    console.print(params)
    console.print(
        f"dummy batch {list(plan.input_shape)} -> output {list(plan.output_shape)}; "
        f"{plan.world_size} workers x micro-batch {plan.micro_batch}; precision {plan.precision}; "
        f"memory per worker: {plan.device}"
    )
    mem = Table(title=f"estimated memory per worker (GiB) at {plan.world_size} workers", title_justify="left")
    for col in ("strategy", "params", "grads", "optim", "act", "act AC", "runtime", "total", "total AC", "fits"):
        mem.add_column(col, justify="left" if col in ("strategy", "fits") else "right")
    for e in plan.estimates:
        fit, fit_ckpt = plan.fits(e.strategy), plan.fits(e.strategy, True)
        flag = "?" if fit is None else ("yes" if fit else ("with AC" if fit_ckpt else "[red]NO"))
        mark = " <" if e.strategy == plan.chosen else ""
        mem.add_row(_LABELS[e.strategy] + mark, _gib(e.params), _gib(e.grads), _gib(e.optim), _gib(e.activations),
                    _gib(e.activations_ckpt), _gib(e.runtime), _gib(e.total), _gib(e.total_ckpt), flag)
    console.print(mem)
    console.print("zero2/zero3: DeepSpeed ZeRO stage; AC: activation checkpointing; ?: set cluster.device_memory_gb")
    console.print(f"recipe's choice (<): {_LONG[plan.chosen]}"
                  f"{' + activation checkpointing' if plan.activation_checkpointing else ''}, "
                  f"~{plan.chosen_total() / GiB:.2f} GiB per worker")
    if plan.recommended:
        console.print(f"recommended: [bold]{plan.recommended}[/bold] (least communication that fits with 10% headroom)")
    elif plan.device_memory is not None:
        console.print("[red]no strategy fits[/red]: add nodes, lower data.global_batch_size or use a smaller model")
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(f"planned in {plan.seconds:.2f} s (no weights allocated)")


def render_launch(console: Console, scaling: dict[str, Any], run: dict[str, Any], where: str) -> None:
    """Print the Ray ScalingConfig/RunConfig the run would use."""
    from rich.table import Table

    t = Table(title=f"would launch ({where})", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("ScalingConfig", ", ".join(f"{k}={v}" for k, v in scaling.items()))
    t.add_row("RunConfig", ", ".join(f"{k}={v}" for k, v in run.items() if k not in ("checkpoints", "worker_env")))
    t.add_row("FailureConfig", f"max_failures={run['max_failures']}")
    t.add_row("checkpoints", run["checkpoints"])
    if "worker_env" in run:
        t.add_row("worker env", run["worker_env"])
    console.print(t)
