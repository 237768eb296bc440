"""Which arguments a registered backbone takes, read from signatures without building anything.

Used twice so the answer is the same: by the factory just before it builds a backbone (a misspelt
``backbone_pretrianed`` is named with a did-you-mean instead of ``ResNet.__init__() got an unexpected keyword
argument``), and by ``encdec-launch recipe`` which checks a recipe without a model build. ``None`` means "cannot
tell" (a constructor taking ``**kwargs`` that it passes on): nothing is refused then.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from encdec.registry import BACKBONE_REGISTRY, Registry

__all__ = ["accepted_backbone_args", "not_implemented_note", "unknown_backbone_args"]


def _named(fn: Callable[..., Any], skip: Iterable[str] = ()) -> list[str] | None:
    """Keyword-passable parameter names of ``fn``; None when it also takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip]


def accepted_backbone_args(name: str) -> list[str] | None:
    """The argument names backbone ``name`` takes (``backbone_<arg>`` in a recipe), or None when unknown.

    Built-in entries: their ``accepted_args`` metadata (a builder that reports unsupported arguments itself), else
    their signature. External sources report it through their own ``accepted_args(name)``.
    """
    prefix, inner = BACKBONE_REGISTRY.find(name)
    source = BACKBONE_REGISTRY[prefix]
    if isinstance(source, Registry):
        declared = source.metadata(inner).get("accepted_args")
        if declared is not None:
            return list(declared)
        return _named(source[inner])  # a functools.partial's signature leaves out its bound arguments
    lookup = getattr(source, "accepted_args", None)
    return lookup(inner) if callable(lookup) else None


def not_implemented_note(name: str, args: Iterable[str]) -> str:
    """`` (x, y: TerraTorch options not implemented here)`` for those of ``args`` the backbone's registry entry
    declares ``not_implemented`` (they get that reason, not only a did-you-mean); empty when none."""
    declared = BACKBONE_REGISTRY.metadata(name).get("not_implemented", ())
    missing = sorted(set(args) & set(declared))
    return f" ({', '.join(missing)}: TerraTorch options not implemented here)" if missing else ""


def unknown_backbone_args(name: str, args: Mapping[str, Any] | Iterable[str]) -> list[tuple[str, str | None]]:
    """``[(arg, closest accepted name or None)]`` for each argument backbone ``name`` does not take."""
    accepted = accepted_backbone_args(name)
    if accepted is None:
        return []
    out = []
    for key in args:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.6)
            out.append((str(key), close[0] if close else None))
    return out
