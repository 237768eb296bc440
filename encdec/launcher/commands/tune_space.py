"""Search spaces: ``choice(8, 16)``, ``uniform(a, b)``, ``loguniform(a, b)``, ``randint(a, b)`` on recipe keys.

A space is parsed without running code (``ast.literal_eval`` of each argument), and every key is checked against
the recipe schema before any trial starts: each choice, and both bounds of a range, are applied to the recipe
like ``--set KEY=VALUE`` and validated, so a misspelt key, a wrong type or a value outside a field's constraints
is one clear error naming the key and the space.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from encdec.config.checks import is_number
from encdec.launcher.recipe.errors import LaunchError

__all__ = ["Space", "parse_space", "parse_search_args", "validate_spaces"]

_FORM = re.compile(r"^\s*(choice|uniform|loguniform|randint)\s*\((.*)\)\s*$", re.S)
KINDS = ("choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Space:
    """One key's space."""

    key: str
    kind: str
    args: tuple[Any, ...]
    text: str

    def probes(self) -> list[Any]:
        """Values that must all be valid for the key: every choice, or both ends of a range."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def domain(self) -> Any:
        """The Ray Tune domain."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


def parse_space(key: str, text: str) -> Space:
    """``choice(1e-9, 1e-3)`` -> Space.

    Raises:
        LaunchError: not one of the four forms, arguments that are not literals, or bad bounds.
    """
    m = _FORM.match(str(text))
    if not m:
        raise LaunchError(f"search space {key}={text!r}: write choice(a, b, ...), uniform(lo, hi), "
                          "loguniform(lo, hi) or randint(lo, hi)")
    kind, body = m.group(1), m.group(2)
    try:
        value = ast.literal_eval(f"({body},)") if body.strip() else ()
    except (ValueError, SyntaxError) as err:
        raise LaunchError(f"search space {key}={text!r}: the arguments must be literals (numbers, strings, "
                          f"true/false as True/False, lists): {err}") from err
    args = tuple(value)
    if kind == "choice":
        if not args:
            raise LaunchError(f"search space {key}={text!r}: choice() needs at least one value")
        return Space(key, kind, args, text)
    if len(args) != 2 or not all(is_number(a) for a in args):
        raise LaunchError(f"search space {key}={text!r}: {kind} takes two numbers (lo, hi)")
    lo, hi = args
    if not lo < hi or (kind == "loguniform" and lo <= 0) or (kind == "randint" and not all(isinstance(a, int) for a in args)):
        need = {"loguniform": "0 < lo < hi", "randint": "integers lo < hi (hi excluded)"}.get(kind, "lo < hi")
        raise LaunchError(f"search space {key}={text!r}: needs {need}")
    return Space(key, kind, args, text)


def parse_search_args(items: Sequence[str]) -> dict[str, str]:
    """``["optim.lr=loguniform(1e-5,1e-3)"]`` -> ``{"optim.lr": "loguniform(1e-5,1e-3)"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LaunchError(f"--search {item!r}: write KEY=SPACE, e.g. --search 'optim.lr=choice(1e-4, 1e-3)'")
        out[key.strip()] = text.strip()
    return out


def _literal(value: Any) -> str:
    """A value as ``--set`` would take it (YAML)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def validate_spaces(recipe_path: str, overrides: Sequence[str], spaces: Mapping[str, str],
                    flags: Mapping[str, Any] | None = None) -> list[Space]:
    """Parse every space and check each probe value against the schema, like ``--set KEY=VALUE``.

    Raises:
        LaunchError: every bad key/space at once, each with the recipe's own message.
    """
    from encdec.launcher.recipe.errors import RecipeError
    from encdec.launcher.recipe.validate import load_recipe

    parsed: list[Space] = []
    problems: list[str] = []
    for key, text in spaces.items():
        try:
            space = parse_space(key, text)
        except LaunchError as err:
            problems.append(str(err))
            continue
        for value in space.probes():
            try:
                load_recipe(recipe_path, [*overrides, f"{key}={_literal(value)}"], flags=flags)
            except RecipeError as err:
                problems.append(f"search space {key}={text!r}: the value {value!r} does not validate:\n{err}")
                break
        else:
            parsed.append(space)
    if problems:
        raise LaunchError("\n".join(problems))
    return parsed
