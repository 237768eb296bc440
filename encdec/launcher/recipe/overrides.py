"""``--set section.key=value`` overrides and CLI flags applied to recipe data before validation.

Values are parsed as YAML (``1e-4`` is a float, ``true`` a bool, ``[1, 2]`` a list, ``null`` None) and then
validated with the rest of the recipe, so an override is typed and checked exactly like the file. A path can
index lists: ``model.necks[0].indices=[5,11,17,23]`` or ``model.necks.0.indices=...``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import yaml

from encdec.config.yaml_load import safe_load
from encdec.launcher.recipe.errors import LineMap, RecipeIssue, format_path

__all__ = ["FLAG_LABELS", "FLAG_PATHS", "apply_flags", "apply_overrides", "parse_override", "parse_path", "set_path"]

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")

# CLI flag -> recipe path (the flag is applied like --set, so it is validated the same way)
FLAG_PATHS = {
    "nodes": "cluster.nodes",
    "workers_per_node": "cluster.workers_per_node",
    "storage": "cluster.storage",
    "name": "run.name",
    "init_from": "run.init_from",
}
FLAG_LABELS = {"cluster.nodes": "--nodes", "cluster.workers_per_node": "--workers-per-node",
               "cluster.storage": "--storage", "run.name": "--name", "run.init_from": "--init-from"}


class OverrideError(ValueError):
    """An override string is malformed or points through a non-container."""


def parse_path(text: str) -> tuple[str | int, ...]:
    """``model.necks[0].name`` or ``model.necks.0.name`` -> ``("model", "necks", 0, "name")``."""
    if not text or text.startswith(".") or text.endswith(".") or ".." in text:
        raise OverrideError(f"'{text}' is not a dotted path like optim.lr or model.necks[0].indices")
    parts: list[str | int] = []
    pos = 0
    for m in _PART.finditer(text):
        if text[pos : m.start()].strip(".") != "":
            raise OverrideError(f"'{text}' is not a dotted path like optim.lr or model.necks[0].indices")
        pos = m.end()
        key, index = m.groups()
        if index is not None:
            parts.append(int(index))
        elif key.isdigit():
            parts.append(int(key))
        else:
            parts.append(key)
    if text[pos:].strip(".") != "" or not parts:
        raise OverrideError(f"'{text}' is not a dotted path like optim.lr or model.necks[0].indices")
    return tuple(parts)


def parse_override(text: str) -> tuple[tuple[str | int, ...], Any]:
    """``optim.lr=3e-4`` -> ``(("optim", "lr"), 0.0003)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise OverrideError(f"'{text}' has no '='; write --set section.key=value (e.g. --set optim.lr=3e-4)")
    path = parse_path(key.strip())
    try:
        value = safe_load(raw) if raw.strip() else None   # a duplicate key in {a: 1, a: 2} is refused too
    except yaml.YAMLError as err:
        raise OverrideError(f"the value '{raw}' is not valid YAML ({err}); quote it or fix the brackets") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    return path, value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text)


def set_path(data: MutableMapping[str, Any], path: Sequence[str | int], value: Any) -> None:
    """Set ``value`` at ``path`` inside nested dicts/lists, creating missing dicts on the way."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else "not a list"
                raise OverrideError(f"{format_path(path[: i + 1])}: index {part} is out of range ({size})")
            node = node[part]
            continue
        if not isinstance(node, MutableMapping):
            raise OverrideError(f"{format_path(path[:i])} is not a section, cannot set {format_path(path)}")
        if part not in node or node[part] is None:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list):
            raise OverrideError(f"{format_path(path[:-1])} is not a list")
        if last == len(node):
            node.append(value)
        elif last < len(node):
            node[last] = value
        else:
            raise OverrideError(f"{format_path(path)}: index {last} is out of range ({len(node)} items)")
        return
    if not isinstance(node, MutableMapping):
        raise OverrideError(f"{format_path(path[:-1])} is not a section, cannot set {format_path(path)}")
    node[last] = value


def apply_overrides(data: MutableMapping[str, Any], overrides: Sequence[str], lines: LineMap) -> list[RecipeIssue]:
    """Apply ``--set`` strings in order; malformed ones become issues (all collected)."""
    issues = []
    for text in overrides:
        try:
            path, value = parse_override(text)
            set_path(data, path, value)
        except OverrideError as err:
            issues.append(
                RecipeIssue((), str(err), text, fix="write --set section.key=value, e.g. --set train.max_steps=20",
                            source=f"--set {text}")
            )
            continue
        lines.add_override(path, f"--set {text}")
    return issues


def apply_flags(
    data: MutableMapping[str, Any],
    flags: Mapping[str, Any],
    lines: LineMap,
    flag_names: Mapping[str, str] | None = None,
) -> list[RecipeIssue]:
    """Apply CLI flags keyed by dotted recipe path (``{"cluster.nodes": 8}``); ``None`` values are skipped.

    ``flag_names`` maps a path to the flag that set it (``{"cluster.nodes": "--nodes"}``) for error messages.
    """
    flag_names = flag_names or {}
    issues = []
    for key, value in flags.items():
        if value is None:
            continue
        path = parse_path(key)
        try:
            set_path(data, path, value)
        except OverrideError as err:
            issues.append(RecipeIssue(path, str(err), value, source=flag_names.get(key, key)))
            continue
        lines.add_override(path, f"{flag_names.get(key, key)} {value}")
    return issues
