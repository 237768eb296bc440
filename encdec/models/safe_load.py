"""Read ``torch.save`` files that someone else wrote without running any of their code.

A pickle names the globals (functions, classes) its objects are rebuilt with, and a plain ``torch.load``
(``weights_only=False``) imports and calls whatever it names: ``os.system``, ``subprocess.Popen``,
``builtins.exec``... Checkpoints come from hubs, colleagues and shared run directories, so every file we did not
write in this process is read here:

1. ``torch.load(weights_only=True)``: torch's own hardened unpickler. Plain state dicts, our run checkpoints'
   optimizer groups and most model files load this way.
2. If that fails (a global outside torch's allowlist), a second pass through a restricted unpickler (``_SafeUnpickler``). It returns a
   real object only for an allowlist (:func:`allowed_globals`: what torch's ``weights_only`` unpickler allows
   - tensor rebuilders, storages, dtypes, ``torch.Size``, ``collections.OrderedDict`` - plus builtin containers
   and numpy arrays/dtypes/scalars, which hold our RNG states). Every other global becomes an inert stand-in
   class (:class:`Stub`) that remembers its arguments and state and runs nothing; with ``stub_unknown=False``
   it is refused instead, naming the global. ``BUILD`` (the opcode that sets an object's state) is allowed on
   stand-ins and on the few types whose ``__setstate__`` only copies data (tensors, ndarrays, dtypes,
   ``OrderedDict``), so no allowlisted object can be re-wired either.

Lightning checkpoints may pickle hyper-parameters and callback states as objects of Lightning's, TerraTorch's or
OmegaConf's classes (a TerraTorch 1.2.11 + Lightning 2.6 checkpoint holds none and loads in step 1): with
stand-ins they load, and their ``state_dict`` tensors are real tensors.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import functools
import io
import logging
import pickle
import warnings
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

__all__ = ["Stub", "UnsafeGlobalError", "allowed_globals", "safe_torch_load"]

LOG = logging.getLogger(__name__)

# Builtins that only build data. Never getattr, eval, exec, type, open, __import__, ...
_BUILTINS = ("bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list", "object", "range",
             "set", "slice", "str", "tuple")


class UnsafeGlobalError(pickle.UnpicklingError):
    """The file names a global outside the allowlist and the caller does not accept stand-ins for it."""


class Stub(dict):  # type: ignore[type-arg]
    """Inert stand-in for a class (or function) a pickle names outside the allowlist.

    It is a ``dict`` so that stand-ins for ``dict`` subclasses (Lightning's ``AttributeDict``) keep their items;
    ``args`` holds what the pickle called it with, ``state`` what it set as state (dict keys are also readable as
    attributes), ``items_appended`` what it appended; calling one gives another stand-in. Nothing the file names
    is imported or called.
    """

    stub_of = "?"  # "module.name" of the global this class stands in for (set per subclass)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items_appended: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.__dict__.update(args=args, kwargs=kwargs, state=None, items_appended=[])

    def _stub_setstate(self, state: Any) -> None:
        # called by the unpickler directly (never through getattr on the instance, which the file could shadow)
        self.__dict__.setdefault("args", ())
        self.__dict__.setdefault("kwargs", {})
        self.__dict__.setdefault("items_appended", [])
        self.__dict__["state"] = state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | type(None)):
            state = state[0]  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str) and not k.startswith("__")})

    def __call__(self, *args: Any, **kwargs: Any) -> Stub:
        # a pickle may call what it built (``partial(os.system, cmd)()``): the result is one more stand-in
        return type(self)(*args, **kwargs)

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("items_appended", []).append(item)

    def extend(self, items: Any) -> None:
        for item in items:
            self.append(item)

    def __repr__(self) -> str:
        return f"<stand-in for {self.stub_of}>"


@functools.lru_cache(maxsize=1)
def allowed_globals() -> dict[str, Any]:
    """``"module.name" -> object`` of every global the restricted unpickler returns for real."""
    allowed: dict[str, Any] = {f"builtins.{n}": getattr(builtins, n) for n in _BUILTINS}
    allowed.update({"collections.OrderedDict": OrderedDict, "collections.Counter": Counter})
    try:  # torch's own weights_only allowlist: tensor rebuilders, storages, dtypes, Size, device, layouts
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed.update(_get_allowed_globals())
    except ImportError:  # private API; the public core of it, should a torch release move it
        allowed.update({"torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
                        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
                        "torch.Size": torch.Size, "torch.device": torch.device,
                        "torch.serialization._get_layout": torch.serialization._get_layout})
    try:
        import numpy as np
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x names its core ``numpy.core``
        try:
            import numpy as np
            from numpy.core import multiarray  # type: ignore[no-redef]
        except ImportError:
            return allowed
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{mod}._reconstruct"] = multiarray._reconstruct  # an empty ndarray of a given dtype
        allowed[f"{mod}.scalar"] = multiarray.scalar  # a numpy scalar from its dtype and bytes
    allowed["numpy.ndarray"] = np.ndarray
    allowed["numpy.dtype"] = np.dtype
    for dtype_cls in vars(getattr(np, "dtypes", object)).values():
        if isinstance(dtype_cls, type) and issubclass(dtype_cls, np.dtype):
            allowed[f"numpy.dtypes.{dtype_cls.__name__}"] = dtype_cls
    return allowed


def _settable_types() -> tuple[type, ...]:
    """Types whose state ``BUILD`` may set: their ``__setstate__`` copies data and calls nothing it is given."""
    types: list[type] = [torch.Tensor, torch.nn.Parameter, OrderedDict, Counter]
    try:
        import numpy as np

        types += [np.ndarray, np.dtype]
    except ImportError:
        pass
    return tuple(types)


class _SafeUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """The pure-Python unpickler with ``find_class`` limited to :func:`allowed_globals` and a checked ``BUILD``.

    The C unpickler's opcodes cannot be overridden; this one's ``dispatch`` table can. With ``find_class``
    restricted, the only callables that reach ``REDUCE`` / ``NEWOBJ`` are allowlisted ones and stand-ins.
    """

    # the pure-Python unpickler's own attributes (not in typeshed)
    proto: int
    fix_imports: bool
    stack: list[Any]
    append: Callable[[Any], None]
    stub_unknown = True
    stubbed: list[str]  # "module.name" of each global replaced, shared by the Unpickler class of one load
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stubs: dict[str, type[Stub]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, which protocol 2 (torch.save's) writes
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        obj = allowed_globals().get(full)
        if obj is not None:
            return obj
        if not self.stub_unknown:
            raise UnsafeGlobalError(
                f"the file names {full!r}, which is not allowed in this file (allowed: tensors, storages, "
                "builtin containers, numpy arrays); it was not written by this program or has been altered"
            )
        if full not in self._stubs:
            self._stubs[full] = type(name.rpartition(".")[2] or "Stub", (Stub,),
                                     {"__module__": module, "__qualname__": name, "stub_of": full})
            self.stubbed.append(full)
        return self._stubs[full]

    def load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if isinstance(inst, Stub):
            Stub._stub_setstate(inst, state)
        elif isinstance(inst, _settable_types()):
            setstate = getattr(type(inst), "__setstate__", None)
            if setstate is not None:
                setstate(inst, state)
            elif isinstance(state, dict):  # OrderedDict's attributes (torch.save keeps ``_metadata`` there)
                inst.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"the file sets the state of a {type(inst).__qualname__} object, which is "
                                         "not allowed (only tensors, arrays and stand-ins)")

    dispatch[pickle.BUILD[0]] = load_build

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.checked_class(cls).__new__(cls, *args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.checked_class(cls).__new__(cls, *args, **kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def checked_class(self, cls: Any) -> type:
        """``cls`` if ``NEWOBJ`` may create an instance of it (a subclass widens the allowlist here)."""
        return _checked_class(cls)


def _checked_class(cls: Any) -> type:
    if isinstance(cls, type) and (issubclass(cls, Stub) or cls in allowed_globals().values()):
        return cls
    raise pickle.UnpicklingError(f"the file creates an object of {cls!r}, which is not an allowed class")


def _pickle_module(stub_unknown: bool, stubbed: list[str]) -> Any:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` class and a ``load``."""
    unpickler = type("_SafeUnpickler", (_SafeUnpickler,), {"stub_unknown": stub_unknown, "stubbed": stubbed})

    def load(f: io.BufferedIOBase, **kw: Any) -> Any:
        return unpickler(f, **kw).load()

    return type("encdec_safe_pickle", (), {"Unpickler": unpickler, "load": staticmethod(load),
                                            "__name__": "encdec_safe_pickle"})


def safe_torch_load(path: str | Path, *, stub_unknown: bool = True, map_location: Any = "cpu",
                    mmap: bool | None = None, stubbed: list[str] | None = None) -> Any:
    """``torch.load`` that runs nothing from the file (see the module doc).

    Args:
        path: a ``torch.save`` file (zip or legacy format).
        stub_unknown: replace globals outside the allowlist by inert :class:`Stub` classes (Lightning's pickled
            hyper-parameters); ``False`` refuses them with :class:`UnsafeGlobalError` (files this program wrote,
            which hold nothing else).
        map_location: as ``torch.load``.
        mmap: memory-map the tensors (default: when the file is a zip, which ``torch.save`` writes since 1.6).
        stubbed: if given, receives the ``"module.name"`` of each global replaced by a stand-in.

    Raises:
        UnsafeGlobalError: (``stub_unknown=False``) the file names a global outside the allowlist.
        pickle.UnpicklingError, RuntimeError, OSError: the file is not a readable ``torch.save`` file, or uses an
            object in a way stand-ins cannot (the message says which).
    """
    path = str(path)
    if mmap is None:
        mmap = zipfile.is_zipfile(path)
    stubbed = [] if stubbed is None else stubbed
    try:
        with warnings.catch_warnings():  # it warns about pickle protocols > 2, which the second pass reads
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception:  # a global outside torch's allowlist, or not a torch file: the second pass says which
        pass
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap,
                         pickle_module=_pickle_module(stub_unknown, stubbed))
    except UnsafeGlobalError as err:
        raise UnsafeGlobalError(f"{path}: {err}") from None
    except Exception as err:
        raise pickle.UnpicklingError(f"{type(err).__name__}: {err}") from err
    if stubbed:
        LOG.info("%s: replaced by inert stand-ins while reading: %s", path, stubbed[:10])
    return obj


