"""Checks of plain values handed to constructors and functions outside a pydantic section.

Python's ``bool`` is an ``int`` (``True == 1``), so ``num_convs=True`` passes ``isinstance(x, int)`` and silently
builds one layer; every "a whole number in this range" check therefore refuses bools. This is the one place that
check is written; it sits in the bottom layer so models, distributed, track and the launcher can all import it.
A value that a recipe section already types (pydantic) needs no second check.
"""

from __future__ import annotations

from typing import Any, TypeGuard

__all__ = ["check_int", "int_problem", "is_number"]


def is_number(value: Any) -> TypeGuard[int | float]:
    """True for an ``int`` or ``float`` that is not a ``bool`` (a flag is not a number to report or plot)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _allowed(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an int >= {minimum} and <= {maximum}"
    if minimum is not None:
        return f"an int >= {minimum}"
    if maximum is not None:
        return f"an int <= {maximum}"
    return "an int"


def int_problem(value: Any, field: str, *, minimum: int | None = 1, maximum: int | None = None,
                whole_floats: bool = False, fix: str | None = None) -> str | None:
    """The problem with ``value`` as a whole number for ``field``, or None when it is one in range.

    Args:
        value: what was given.
        field: the name the user knows it by (``"FCNDecoder: num_convs"``, ``"cluster.nodes"``, ``"--nodes"``).
        minimum: smallest allowed value (None: no lower bound).
        maximum: largest allowed value (None: no upper bound).
        whole_floats: also accept a float with no fraction (``2.0``, as YAML or JSON may write a count).
        fix: how to fix it; by default "give a whole number" with the allowed range.

    Returns:
        ``"<field> must be <allowed>, got <value> (<why>); fix: <fix>"`` or None.
    """
    allowed = _allowed(minimum, maximum)
    number = isinstance(value, int) or (whole_floats and isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not number:
        why = "a bool" if isinstance(value, bool) else f"a {type(value).__name__}"
    elif (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        why = "out of range"
    else:
        return None
    hint = fix or "write a whole number" + allowed.removeprefix("an int")
    return f"{field} must be {allowed}, got {value!r} ({why}); fix: {hint}"


def check_int(value: Any, field: str, *, minimum: int | None = 1, maximum: int | None = None,
              optional: bool = False, whole_floats: bool = False, fix: str | None = None,
              error: type[Exception] = ValueError) -> int:
    """``value`` as an int when it is a whole number in range (bools refused), else raise ``error``.

    Args:
        value: what was given.
        field: the name the user knows it by; it starts the message.
        minimum: smallest allowed value (None: no lower bound).
        maximum: largest allowed value (None: no upper bound).
        optional: None is allowed (and returned as is).
        whole_floats: also accept a float with no fraction.
        fix: how to fix it (default: give a whole number in the allowed range).
        error: the exception type to raise (a layer's own typed error, e.g. ``StrategyError``).

    Raises:
        error: naming the field, the value, what is allowed and the fix.
    """
    if value is None and optional:
        return value  # type: ignore[return-value]
    problem = int_problem(value, field, minimum=minimum, maximum=maximum, whole_floats=whole_floats, fix=fix)
    if problem is not None:
        if optional:
            problem = problem.replace(", got ", " or None, got ", 1)
        raise error(problem)
    return int(value)
