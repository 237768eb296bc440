"""Reading YAML that users hand us (recipes, TerraTorch configs, cluster manifests): safe, and strict about keys.

PyYAML's ``safe_load`` lets the last of two equal keys win without a word (``train: {max_steps: 10}`` then, further
down, ``train: {epochs: 1}`` silently drops the first section). :func:`safe_load` refuses a duplicate key at any
depth, naming every such key, both lines and the path to it; it builds only plain data (never runs code: SafeLoader).
:func:`read_text` refuses what is not a text file (a directory, a GeoTIFF, a binary) with one line instead of a
``UnicodeDecodeError`` traceback. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

__all__ = ["DuplicateKey", "DuplicateKeyError", "NotTextError", "read_text", "safe_load", "safe_load_all"]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# magic numbers of the files most often passed by mistake: GeoTIFF/TIFF, PNG, JPEG, zip (a .pt checkpoint), gzip
_MAGIC = {b"II*\x00": "a TIFF/GeoTIFF image", b"MM\x00*": "a TIFF/GeoTIFF image", b"\x89PNG": "a PNG image",
          b"\xff\xd8\xff": "a JPEG image", b"PK\x03\x04": "a zip archive (e.g. a torch checkpoint)",
          b"\x1f\x8b": "a gzip file", b"II+\x00": "a BigTIFF image", b"MM\x00+": "a BigTIFF image"}


@dataclass(frozen=True)
class DuplicateKey:
    """A key written twice in one mapping: its path (parents, then the key as written the second time), both 1-based
    lines and, when the two are spelled differently but read as one key (``yes``/``true``, ``1``/``1.0``), the first
    spelling and the value both read as."""

    path: tuple[str | int, ...]
    line: int
    first_line: int
    first_spelling: str = ""
    reads_as: str = ""

    @property
    def note(self) -> str:
        """Why two differently written keys clash (``"'yes' and 'true' both read as True"``); empty otherwise."""
        if not self.first_spelling:
            return ""
        return f"'{self.first_spelling}' and '{self.path[-1]}' both read as {self.reads_as}"

    def describe(self) -> str:
        dotted = ".".join(str(p) for p in self.path)
        note = f"; {self.note}" if self.note else ""
        return f"'{dotted}' is given twice (lines {self.first_line} and {self.line}{note}); YAML would keep only the last"


class DuplicateKeyError(ConstructorError):
    """Mappings hold the same key twice (a ``MarkedYAMLError``). ``duplicates`` lists every one, in document order;
    the message and ``problem_mark`` are those of the outermost (the first a plain load would meet)."""

    def __init__(self, *args: Any, duplicates: tuple[DuplicateKey, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.duplicates = duplicates


class NotTextError(ValueError):
    """The file is not a YAML text file (a directory, an image, a binary...). The message is one line."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that raises :class:`DuplicateKeyError` listing every key written twice in one mapping.

    Keys are compared as constructed (so ``yes`` and ``true``, or ``1`` and ``1.0``, are the same key, as in the dict
    PyYAML would build), before any value is built. Merge keys (``<<: *base`` then overriding keys) are YAML's own
    override and stay allowed.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicates(node)
        return super().construct_document(node)

    def _refuse_duplicates(self, root: yaml.Node) -> None:
        found: list[tuple[int, DuplicateKey, yaml.MappingNode, yaml.Node, yaml.Node, Any]] = []
        visited: set[int] = set()

        def walk(node: yaml.Node, path: tuple[str | int, ...], depth: int) -> None:
            if id(node) in visited:  # an alias: checked where its anchor is (and no endless loop on recursion)
                return
            visited.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    walk(item, (*path, i), depth + 1)
            elif isinstance(node, yaml.MappingNode):
                seen: dict[Any, tuple[Any, yaml.Node]] = {}  # key -> (the key as first read, its node)
                for key_node, value_node in node.value:
                    if key_node.tag == _MERGE_TAG:
                        walk(value_node, path, depth + 1)
                        continue
                    key = self.construct_object(key_node, deep=True)
                    name = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key)
                    try:
                        earlier = seen.setdefault(key, (key, key_node))
                    except TypeError:  # an unhashable key: SafeLoader reports it itself
                        earlier = (key, key_node)
                    if earlier[1] is not key_node:
                        first_key, first = earlier
                        spelled = first.value if isinstance(first, yaml.ScalarNode) else str(first_key)
                        differs = spelled != name  # yes/true, 1/1.0: one key, written two ways
                        dup = DuplicateKey((*path, name), key_node.start_mark.line + 1, first.start_mark.line + 1,
                                           spelled if differs else "", repr(first_key) if differs else "")
                        found.append((depth, dup, node, first, key_node, key))
                    walk(value_node, (*path, name), depth + 1)

        walk(root, (), 0)
        if not found:
            return
        _, _, mapping, first, key_node, key = min(found, key=lambda f: f[0])  # outermost, then first in the text
        raise DuplicateKeyError("while constructing a mapping", mapping.start_mark,
                                f"found duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                                key_node.start_mark, duplicates=tuple(f[1] for f in found))


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys.

    Raises:
        DuplicateKeyError: keys given twice in one mapping (a ``yaml.YAMLError`` with the line; ``.duplicates``
            lists them all, each with its path and both lines).
        yaml.YAMLError: any other syntax error.
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: plain data only


def safe_load_all(text: str) -> Iterator[Any]:
    """``yaml.safe_load_all`` that refuses duplicate keys (see :func:`safe_load`)."""
    return yaml.load_all(text, Loader=_UniqueKeyLoader)


def read_text(path: str | Path, what: str = "YAML file") -> str:
    """The text of a YAML file, or one clear line saying why ``path`` is not one.

    Raises:
        FileNotFoundError: no such path (the message names it).
        NotTextError: a directory, a known binary format (TIFF, PNG, zip...) or bytes that are not UTF-8 text.
    """
    p = Path(path)
    if p.is_dir():
        raise NotTextError(f"{what} {p} is a directory; give the {what} inside it (a .yaml file)")
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    raw = p.read_bytes()
    for magic, kind in _MAGIC.items():
        if raw.startswith(magic):
            raise NotTextError(f"{what} {p} is {kind}, not YAML text; give the .yaml file")
    if b"\x00" in raw[:8192]:
        raise NotTextError(f"{what} {p} is a binary file, not YAML text; give the .yaml file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise NotTextError(f"{what} {p} is not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
                           "give the .yaml file, saved as UTF-8") from None
