"""Recipe errors: every problem collected, each with its YAML path, line, bad value and fix.

A recipe is checked in layers (YAML syntax, schema, ``--set`` overrides, registry names, the meta-device build);
each layer adds :class:`RecipeIssue` objects and :class:`RecipeError` reports them all at once, so a user fixes a
recipe in one pass instead of one error per launch. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "LaunchError",
    "LineMap",
    "RecipeError",
    "RecipeIssue",
    "did_you_mean",
    "format_path",
    "line_map",
]

PathT = tuple[str | int, ...]


class LaunchError(RuntimeError):
    """A launch cannot proceed (cluster too small, storage unreachable, run dir missing...). Says how to fix it."""


def did_you_mean(value: object, choices: Iterable[object]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to ``value`` (empty string when none is close)."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=2, cutoff=0.6)
    if not close:
        lowered = {n.lower(): n for n in names}
        close = [lowered[str(value).lower()]] if str(value).lower() in lowered else []
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def format_path(path: Sequence[str | int]) -> str:
    """``("model", "necks", 0, "name")`` -> ``model.necks[0].name`` (how users write it in ``--set`` too)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(recipe)"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class RecipeIssue:
    """One problem in a recipe.

    Attributes:
        path: where it is, as keys/indices from the recipe root (``("optim", "lr")``).
        message: what is wrong.
        value: the value received (``MISSING`` when the key is absent).
        fix: how to fix it (allowed values, a did-you-mean, the flag to use).
        line: 1-based line in the recipe file, when known.
        source: the file or ``--set`` override the value came from.
    """

    path: PathT
    message: str
    value: Any = None
    fix: str = ""
    line: int | None = None
    source: str | None = None
    has_value: bool = True

    def render(self) -> str:
        """One readable line (plus a fix line) for the terminal."""
        where = format_path(self.path)
        loc = ""
        if self.source and self.line:
            loc = f" ({self.source}:{self.line})"
        elif self.source:
            loc = f" ({self.source})"
        got = f"; got {_short(self.value)}" if self.has_value else ""
        text = f"{where}{loc}: {self.message}{got}"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


class RecipeError(ValueError):
    """All problems found in a recipe, reported together.

    Args:
        issues: the problems, in the order they were found.
        recipe_path: the recipe file, for the heading.
    """

    def __init__(self, issues: list[RecipeIssue], recipe_path: str | None = None) -> None:
        self.issues = list(issues)
        self.recipe_path = recipe_path
        super().__init__(self.issues, recipe_path)

    def __str__(self) -> str:
        head = f"recipe {self.recipe_path}" if self.recipe_path else "recipe"
        n = len(self.issues)
        lines = [f"{head} has {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  {i + 1}. " + issue.render().replace("\n", "\n   ") for i, issue in enumerate(self.issues)]
        return "\n".join(lines)

    def paths(self) -> list[str]:
        """The dotted paths of all issues (handy in tests and summaries)."""
        return [format_path(i.path) for i in self.issues]


class LineMap:
    """Maps a recipe path to the line it was written on (from PyYAML's node marks) and to its source.

    ``--set`` overrides register themselves here so their errors name the flag instead of a file line.
    """

    def __init__(self, source: str | None = None) -> None:
        self.source = source
        self._lines: dict[PathT, int] = {}
        self._overrides: dict[PathT, str] = {}

    def add(self, path: PathT, line: int) -> None:
        self._lines[path] = line

    def add_override(self, path: PathT, source: str) -> None:
        """Record that ``path`` was set on the command line (``source`` names how, e.g. ``--set optim.lr=1``)."""
        self._overrides[path] = source

    def locate(self, path: Sequence[str | int]) -> tuple[int | None, str | None]:
        """(line, source) of the deepest known prefix of ``path`` (an override wins over the file)."""
        path = tuple(path)
        hits = [opath for opath in self._overrides if path[: len(opath)] == opath]
        if hits:
            return None, self._overrides[max(hits, key=len)]
        for n in range(len(path), 0, -1):  # the root's line (1) says nothing: no line rather than a wrong one
            if path[:n] in self._lines:
                return self._lines[path[:n]], self.source
        return None, self.source

    def attach(self, issues: Iterable[RecipeIssue]) -> list[RecipeIssue]:
        """Fill ``line``/``source`` of issues that do not have them yet."""
        out = []
        for issue in issues:
            if issue.line is None and issue.source is None:
                issue.line, issue.source = self.locate(issue.path)
            out.append(issue)
        return out


def _walk(node: yaml.Node, path: PathT, lines: LineMap) -> None:
    lines.add(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            lines.add((*path, key), key_node.start_mark.line + 1)
            _walk(value_node, (*path, key), lines)
            lines.add((*path, key), key_node.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines)


def line_map(text: str, source: str | None = None) -> LineMap:
    """Line numbers of every key and list item of a YAML document (empty map for empty/invalid text)."""
    lines = LineMap(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if node is not None:
        _walk(node, (), lines)
    return lines


def yaml_syntax_issue(err: yaml.YAMLError, source: str | Path) -> RecipeIssue:
    """A YAML parse error as an issue with its line."""
    mark = getattr(err, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(err, "problem", None) or str(err)
    return RecipeIssue(
        path=(),
        message=f"is not valid YAML: {problem}",
        has_value=False,
        fix="check indentation and quoting around that line (YAML needs spaces, not tabs, and 'key: value')",
        line=line,
        source=str(source),
    )


def missing_mapping_issue(data: object, source: str) -> RecipeIssue:
    """The document is not a mapping of sections."""
    return RecipeIssue(
        path=(),
        message="must be a mapping of sections (task, run, model, loss, data, optim, train, cluster)",
        value=data,
        fix="start from recipes/quickstart.yaml",
        source=source,
    )

