"""Sharding strategies (none, ddp, fsdp, deepspeed) behind one ``Strategy`` interface, and process-group set-up.

Each strategy imports its library lazily: importing this package costs nothing beyond torch (and the recipe's
typed sections, ``encdec.config``, the one layer below this one).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from encdec.config.names import STRATEGIES
from encdec.distributed.process_group import (
    barrier,
    default_backend,
    default_device,
    find_free_port,
    init_process_group,
)
from encdec.distributed.strategy import Strategy, StrategyError

__all__ = [
    "STRATEGIES",
    "Strategy",
    "StrategyError",
    "barrier",
    "default_backend",
    "default_device",
    "find_free_port",
    "init_process_group",
    "make_strategy",
]

def make_strategy(name: str, **opts: Any) -> Strategy:
    """Build the strategy named by the recipe's ``train.strategy``.

    Args:
        name: ``none`` | ``ddp`` | ``fsdp`` | ``deepspeed``.
        **opts: constructor options. All: ``optimizer_factory`` (required by ``setup``: the loop passes
            ``encdec.train.optim.build_optimizer``), ``adapter_only``, ``device``, ``pg_timeout_s``.
            ``ddp``: ``bucket_cap_mb``, ``sync_batchnorm``. ``fsdp``: ``reshard_after_forward``, ``sync_batchnorm``,
            ``build_on_rank0``.
            ``deepspeed``: ``zero_stage`` (2 | 3), ``micro_batch`` (per-rank micro-batch size, for DeepSpeed's
            batch bookkeeping), ``native_optimizer``.

    Raises:
        StrategyError: unknown name or option.
    """
    if name == "none":
        from encdec.distributed.single import SingleProcessStrategy as cls
    elif name == "ddp":
        from encdec.distributed.ddp import DDPStrategy as cls  # type: ignore[assignment]
    elif name == "fsdp":
        from encdec.distributed.fsdp import FSDPStrategy as cls  # type: ignore[assignment]
    elif name == "deepspeed":
        from encdec.distributed.deepspeed import DeepSpeedStrategy as cls  # type: ignore[assignment]
    else:
        close = difflib.get_close_matches(str(name), STRATEGIES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise StrategyError(f"strategy {name!r} is not supported (train.strategy); use one of {', '.join(STRATEGIES)}.{hint}")
    allowed = _options(cls)
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise StrategyError(
            f"strategy {name!r} got an unsupported option {unknown}; its options are {sorted(allowed)}"
        )
    return cls(**opts)


def _options(cls: type) -> set[str]:
    """Keyword options of a strategy class and its bases (subclasses forward ``**kwargs`` to ``Strategy``)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                names.add(p.name)
    return names
