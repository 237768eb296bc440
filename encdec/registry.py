"""Registries of model components: one generic ``Registry`` per kind, and ``MultiSourceRegistry``
to look a name up across several sources (built-in first, then external libraries such as timm/smp).

The call shapes follow TerraTorch so user code ports unchanged::

    @BACKBONE_REGISTRY.register            # keyed by the function/class name
    def my_backbone(**kwargs): ...

    BACKBONE_REGISTRY.build("timm_resnet18", in_chans=6)   # prefix picks the source
    BACKBONE_REGISTRY.build("resnet18")                    # sources tried in order
    BACKBONE_REGISTRY["timm"]                               # a source by its prefix

Entries may carry metadata (bands, patch size, embed dim, fused-qkv module name, ``includes_head``...) so a
recipe can be checked without building weights. ``build`` never swallows exceptions raised inside a
constructor: a ``TypeError`` from user code surfaces as itself, not as "not registered".
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Entry",
    "MultiSourceRegistry",
    "NotCallableError",
    "Registry",
    "RegistryError",
    "Source",
    "UnknownNameError",
]


class RegistryError(ValueError):
    """A registry was used wrongly (duplicate name, bad source prefix...)."""


class NotCallableError(RegistryError, TypeError):
    """Something that cannot construct a component was registered. A ``TypeError`` too, as in TerraTorch and
    Python's convention for a wrong kind of argument."""


class UnknownNameError(RegistryError, KeyError):
    """A name is not registered. Subclasses ``KeyError`` too, for ``try: reg[name]`` callers."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    """One registered constructor and its metadata."""

    name: str
    builder: Callable[..., Any]
    metadata: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Source(Protocol):
    """What ``MultiSourceRegistry`` needs from a source (a ``Registry`` or a lazy external one)."""

    def __contains__(self, name: object) -> bool: ...

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any: ...

    def names(self) -> list[str]: ...

    def metadata(self, name: str) -> Mapping[str, Any]: ...


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class Registry:
    """A name -> constructor mapping with metadata. Registering a name twice raises."""

    def __init__(self, kind: str = "component", autoload: str | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._autoload = autoload

    def _load(self) -> None:
        # Built-in entries register when their modules are imported; import them on first lookup so
        # `from encdec.registry import NECK_REGISTRY` works without importing torch at package import.
        if self._autoload is not None:
            module, self._autoload = self._autoload, None
            importlib.import_module(module)

    # -- registration ------------------------------------------------------------------------
    def register(
        self,
        obj: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        **metadata: Any,
    ) -> Any:
        """Register ``obj`` under ``name`` (default: its ``__name__``).

        Use bare (``@reg.register``), called (``@reg.register(name="x", embed_dim=768)``) or directly
        (``reg.register(cls)``). Returns ``obj`` unchanged so it stays importable and picklable.
        """

        def _do(target: Callable[..., Any]) -> Callable[..., Any]:
            if not callable(target):
                raise NotCallableError(
                    f"cannot register {target!r} ({type(target).__name__}) in the {self.kind} registry: it is not "
                    "callable; register a class or a function that builds the component (use name=... to pick "
                    "the registry name)"
                )
            key = name or getattr(target, "__name__", None)
            if not key:
                raise RegistryError(f"cannot register {target!r} in the {self.kind} registry without a name")
            if key in self._entries:
                raise RegistryError(
                    f"{self.kind} {key!r} is already registered (by {self._entries[key].builder!r}); "
                    "choose another name"
                )
            self._entries[key] = Entry(key, target, dict(metadata))
            return target

        return _do if obj is None else _do(obj)

    # -- lookup ------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self.entry(name).builder

    def names(self) -> list[str]:
        """All registered names, in registration order."""
        self._load()
        return list(self._entries)

    def entry(self, name: str) -> Entry:
        """The ``Entry`` for ``name``; ``UnknownNameError`` with close matches if absent."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"{self.kind} {name!r} is not registered.{_suggest(name, self.names())} "
                f"Available: {', '.join(self.names()) or '(none)'}."
            ) from None

    def metadata(self, name: str) -> Mapping[str, Any]:
        """Metadata given at registration (readable without building anything)."""
        return self.entry(name).metadata

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the constructor registered as ``name``. Exceptions raised by it propagate unchanged."""
        return self.entry(name).builder(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"


class MultiSourceRegistry:
    """Looks names up across ordered sources; ``<prefix>_<name>`` addresses one source directly.

    Sources are ``Registry`` objects or lazy adapters (timm, smp) that import their library on first use,
    so importing ``encdec`` never imports timm's model zoo or smp.
    """

    def __init__(self, kind: str = "component", autoload: str | None = None, **sources: Source) -> None:
        self.kind = kind
        self._sources: dict[str, Source] = {}
        self._autoload = autoload
        for prefix, source in sources.items():
            self.register_source(prefix, source)

    def register_source(self, prefix: str, registry: Source) -> None:
        """Add a source, tried after those already registered."""
        if prefix in self._sources:
            raise RegistryError(f"{self.kind} source {prefix!r} is already registered")
        self._sources[prefix] = registry

    def _load(self) -> None:
        if self._autoload is not None:  # see Registry._load
            module, self._autoload = self._autoload, None
            importlib.import_module(module)

    @property
    def sources(self) -> dict[str, Source]:
        """Sources by prefix, in lookup order."""
        self._load()
        return dict(self._sources)

    def __getitem__(self, prefix: str) -> Source:
        self._load()
        try:
            return self._sources[prefix]
        except KeyError:
            raise UnknownNameError(
                f"{self.kind} source {prefix!r} does not exist.{_suggest(prefix, list(self._sources))} "
                f"Sources: {', '.join(self._sources)}."
            ) from None

    def register(self, obj: Callable[..., Any] | None = None, *, name: str | None = None, **metadata: Any) -> Any:
        """Register into the first (built-in) source, so ``@BACKBONE_REGISTRY.register`` works."""
        first = next(iter(self._sources.values()), None)
        if not isinstance(first, Registry):
            raise RegistryError(f"the {self.kind} registry has no built-in source to register into")
        return first.register(obj, name=name, **metadata)

    def _resolve(self, name: str) -> tuple[Source, str] | None:
        self._load()
        # An explicit prefix wins: "timm_resnet18" -> source "timm", name "resnet18". A built-in entry
        # whose own name starts with a prefix (e.g. "smp_something" registered locally) is found below.
        for prefix, source in self._sources.items():
            if name.startswith(prefix + "_"):
                stripped = name[len(prefix) + 1 :]
                if stripped in source:
                    return source, stripped
        for source in self._sources.values():
            if name in source:
                return source, name
        return None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._resolve(name) is not None

    def find(self, name: str) -> tuple[str, str]:
        """``(source prefix, name within the source)`` for ``name``, or ``UnknownNameError``."""
        resolved = self._resolve(name)
        if resolved is None:
            raise self._unknown(name)
        source, inner = resolved
        prefix = next(p for p, s in self._sources.items() if s is source)
        return prefix, inner

    def metadata(self, name: str) -> Mapping[str, Any]:
        """Metadata of ``name`` from the source that holds it."""
        prefix, inner = self.find(name)
        return self._sources[prefix].metadata(inner)

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Build ``name`` from the first source holding it. Constructor errors propagate unchanged."""
        prefix, inner = self.find(name)
        return self._sources[prefix].build(inner, *args, **kwargs)

    def names(self, prefixed: bool = True) -> list[str]:
        """All names; external sources' names carry their prefix (``timm_resnet18``)."""
        self._load()
        out: list[str] = []
        for i, (prefix, source) in enumerate(self._sources.items()):
            out += [n if (i == 0 or not prefixed) else f"{prefix}_{n}" for n in source.names()]
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def _unknown(self, name: str) -> UnknownNameError:
        candidates: list[str] = []
        for i, (prefix, source) in enumerate(self._sources.items()):
            try:
                names = source.names()
            except Exception:  # an uninstallable optional library must not hide the real message
                names = []
            candidates += names if i == 0 else [f"{prefix}_{n}" for n in names]
        return UnknownNameError(
            f"{self.kind} {name!r} is not registered in any source (tried: {', '.join(self._sources)})."
            f"{_suggest(name, candidates)} List them with "
            f"`encdec.{self.kind.upper()}_REGISTRY.names()` or address a source as '<source>_<name>'."
        )

    def __repr__(self) -> str:
        return f"MultiSourceRegistry({self.kind!r}, sources={list(self._sources)})"


# The registries every component registers into. External sources (timm, smp) are added lazily by
# ``encdec.models`` so that importing this module stays cheap.
BACKBONE_REGISTRY = MultiSourceRegistry("backbone", autoload="encdec.models", encdec=Registry("backbone"))
DECODER_REGISTRY = MultiSourceRegistry("decoder", autoload="encdec.models", encdec=Registry("decoder"))
NECK_REGISTRY = Registry("neck", autoload="encdec.models")
NECKS_REGISTRY = NECK_REGISTRY  # the seed document's name for the same object

__all__ += ["BACKBONE_REGISTRY", "DECODER_REGISTRY", "NECKS_REGISTRY", "NECK_REGISTRY"]
