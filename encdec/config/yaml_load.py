"""Reading YAML that users hand us (recipes, TerraTorch configs, cluster manifests): safe, and strict about keys.

PyYAML's ``safe_load`` lets the last of two equal keys win without a word (``train: {max_steps: 10}`` then, further
down, ``train: {epochs: 1}`` silently drops the first section). :func:`safe_load` refuses a duplicate key at any
depth, naming the key, both lines and the path to it; it builds only plain data (never runs code: SafeLoader).
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

__all__ = ["DuplicateKey", "DuplicateKeyError", "NotTextError", "duplicate_keys", "read_text", "safe_load",
           "safe_load_all"]

_MERGE_TAG = "tag:yaml.org,2002:merge"
# magic numbers of the files most often passed by mistake: GeoTIFF/TIFF, PNG, JPEG, zip (a .pt checkpoint), gzip
_MAGIC = {b"II*\x00": "a TIFF/GeoTIFF image", b"MM\x00*": "a TIFF/GeoTIFF image", b"\x89PNG": "a PNG image",
          b"\xff\xd8\xff": "a JPEG image", b"PK\x03\x04": "a zip archive (e.g. a torch checkpoint)",
          b"\x1f\x8b": "a gzip file", b"II+\x00": "a BigTIFF image", b"MM\x00+": "a BigTIFF image"}


@dataclass(frozen=True)
class DuplicateKey:
    """A key written twice in one mapping: its path (parents, then the key) and both 1-based lines."""

    path: tuple[str | int, ...]
    line: int
    first_line: int

    def describe(self) -> str:
        dotted = ".".join(str(p) for p in self.path)
        return f"'{dotted}' is given twice (lines {self.first_line} and {self.line}); YAML would keep only the last"


class DuplicateKeyError(ConstructorError):
    """A mapping holds the same key twice (a ``MarkedYAMLError``: its ``problem_mark`` is the second one)."""


class NotTextError(ValueError):
    """The file is not a YAML text file (a directory, an image, a binary...). The message is one line."""


def _scalar_key(node: yaml.Node) -> Any:
    return node.value if isinstance(node, yaml.ScalarNode) else None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that raises :class:`DuplicateKeyError` on the first key written twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:  # type: ignore[override]
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # ``<<: *base`` then overriding keys is YAML's own override
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first is not None:
                raise DuplicateKeyError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {first.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys.

    Raises:
        DuplicateKeyError: a key given twice in one mapping (a ``yaml.YAMLError`` with the line).
        yaml.YAMLError: any other syntax error.
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: plain data only


def safe_load_all(text: str) -> Iterator[Any]:
    """``yaml.safe_load_all`` that refuses duplicate keys (see :func:`safe_load`)."""
    return yaml.load_all(text, Loader=_UniqueKeyLoader)


def duplicate_keys(text: str) -> list[DuplicateKey]:
    """Every duplicate key of a YAML document (for reporting them all at once); empty when it does not parse."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    found: list[DuplicateKey] = []

    def walk(node: yaml.Node | None, path: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value in node.value:
                key = _scalar_key(key_node)
                if key_node.tag == _MERGE_TAG or key is None:
                    continue
                line = key_node.start_mark.line + 1
                if key in first:
                    found.append(DuplicateKey((*path, key), line, first[key]))
                else:
                    first[key] = line
                walk(value, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    walk(root, ())
    return found


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
