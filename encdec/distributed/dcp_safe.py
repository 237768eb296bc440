"""Read a torch.distributed.checkpoint (DCP) directory without running code from it.

DCP's own reader unpickles two things with a plain ``pickle.load``/``torch.load(weights_only=False)``: the
``.metadata`` file (which tensors and byte items are where) and every non-tensor item (optimizer hyper-parameters,
our step counters). Run directories are shared and handed around (``--resume``, ``--init-from``, ``predict RUN``),
so a crafted ``.metadata`` would run whatever it names on every rank. Here both go through restricted unpicklers:

- ``.metadata``: :class:`~encdec.models.safe_load._SafeUnpickler` widened to the plain data classes DCP writes
  (``torch.distributed.checkpoint.metadata``, the file reader's ``_StorageInfo``, paths); anything else is refused
  with the global's name.
- byte items: ``torch.load(weights_only=True)`` (numbers, strings, lists, dicts, tensors).

Tensor shards were already read with ``weights_only=True`` by DCP.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import pathlib
import pickle
from typing import Any, ClassVar

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from encdec.models.safe_load import UnsafeGlobalError, _SafeUnpickler

__all__ = ["SafeDcpLoadPlanner", "SafeFileSystemReader", "load_dcp_metadata"]


@functools.lru_cache(maxsize=1)
def _dcp_globals() -> dict[str, Any]:
    """The data classes DCP pickles into ``.metadata`` (looked up by name, so a torch that adds one still loads
    as long as it lives in the metadata module)."""
    allowed: dict[str, Any] = {}
    for name, obj in vars(dcp_metadata).items():
        if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__:
            allowed[f"{dcp_metadata.__name__}.{name}"] = obj
    try:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        allowed["torch.distributed.checkpoint.filesystem._StorageInfo"] = _StorageInfo
    except ImportError:
        pass
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath,
                pathlib.Path):
        allowed[f"pathlib.{cls.__name__}"] = cls
    return allowed


def _settable(inst: Any) -> bool:
    cls = type(inst)
    return dataclasses.is_dataclass(cls) and f"{cls.__module__}.{cls.__qualname__}" in _dcp_globals()


class _MetadataUnpickler(_SafeUnpickler):
    """Restricted unpickler for DCP's ``.metadata``: no stand-ins, only data classes and torch's data types."""

    stub_unknown = False
    stubbed = list[str]()  # noqa: RUF012 (never filled: stub_unknown is False)
    dispatch: ClassVar[dict[int, Any]] = dict(_SafeUnpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        obj = _dcp_globals().get(f"{module}.{name}")
        if obj is not None:
            return obj
        return super().find_class(module, name)

    def load_build(self) -> None:
        state = self.stack[-1]
        inst = self.stack[-2]
        if not _settable(inst):
            super().load_build()
            return
        self.stack.pop()
        own = type(inst).__dict__.get("__setstate__")
        if own is not None:  # TensorProperties: rebuilds its memory format from a plain tuple
            own(inst, state)
            return
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if part is None:
                continue
            if not isinstance(part, dict) or not all(isinstance(k, str) for k in part):
                raise pickle.UnpicklingError(f"the file sets the state of a {type(inst).__qualname__} object "
                                             "to something other than named fields")
            for key, value in part.items():
                object.__setattr__(inst, key, value)  # frozen dataclasses too, as pickle itself does

    dispatch[pickle.BUILD[0]] = load_build

    def checked_class(self, cls: Any) -> type:
        if isinstance(cls, type) and cls in _dcp_globals().values():
            return cls
        return super().checked_class(cls)


def load_dcp_metadata(stream: io.BufferedIOBase | Any, where: str = ".metadata") -> dcp_metadata.Metadata:
    """Unpickle a DCP ``.metadata`` stream with :class:`_MetadataUnpickler`; raise a clear error otherwise."""
    try:
        meta = _MetadataUnpickler(stream).load()
    except UnsafeGlobalError as err:
        raise UnsafeGlobalError(f"{where}: {err}") from None
    except Exception as err:
        raise pickle.UnpicklingError(f"{where} is not a DCP metadata file ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f"{where} holds a {type(meta).__qualname__}, not DCP metadata")
    return meta


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read by :func:`load_dcp_metadata`.

    Args:
        path: the DCP checkpoint directory.
        metadata: the checkpoint's global ``.metadata`` when the caller has already read it with
            :func:`load_dcp_metadata` (so that a refusal gives its own error before DCP wraps it); it is then
            returned by ``read_metadata`` instead of being read and unpickled a second time.
    """

    def __init__(self, path: str | os.PathLike[str], *, metadata: dcp_metadata.Metadata | None = None,
                 **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._given_metadata = metadata

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """See ``FileSystemReader.reset``; pointed at another checkpoint, the handed-in metadata no longer holds."""
        if checkpoint_id:
            self._given_metadata = None
        super().reset(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        if rank is None and self._given_metadata is not None:
            meta = self._given_metadata
        else:  # no pre-read, or DCP's fallback to a rank-local __<rank>.metadata
            path = self._get_metadata_path(rank)
            with self.fs.create_stream(path, "rb") as f:
                meta = load_dcp_metadata(f, str(path))
        # what FileSystemReader.read_metadata does after its own pickle.load
        storage_meta = getattr(meta, "storage_meta", None) or dcp_metadata.StorageMeta()
        storage_meta.load_id = self.load_id
        meta.storage_meta = storage_meta
        return meta


class SafeDcpLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with byte items read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as err:
            # torch's message is a paragraph about weights_only; its last line names the refused global
            why = [line for line in str(err).splitlines() if line.strip()][-2:]
            raise UnsafeGlobalError(f"checkpoint item {read_item.dest_index.fqn!r} holds an object outside the "
                                    f"allowed data types (it was not written by this program or was altered): "
                                    f"{' '.join(why)}") from None
        # what DefaultLoadPlanner.load_bytes does after its own torch.load
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
