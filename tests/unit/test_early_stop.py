"""The early-stopping decision: patience, min_delta, modes, NaN, a missing metric, and its checkpointed state."""

from __future__ import annotations

import math

import pytest

from encdec.train.early_stop import EarlyStopError, EarlyStopper


def _run(stopper: EarlyStopper, values: list[float], key: str = "val/loss") -> list[bool]:
    return [stopper.update({key: v, "val/other": 0.0}) for v in values]


def test_min_mode_counts_validations_without_improvement() -> None:
    s = EarlyStopper.from_section({"metric": "val/loss", "mode": "min", "patience": 2})
    assert s is not None
    assert _run(s, [1.0, 0.9, 0.95, 0.8, 0.85, 0.81]) == [False, False, False, False, False, True]
    assert s.best == 0.8 and s.bad == 2


def test_max_mode_and_min_delta() -> None:
    s = EarlyStopper.from_section({"metric": "val/mIoU", "mode": "max", "patience": 2, "min_delta": 0.05})
    assert s is not None
    # +0.03 is not enough to count as improvement; +0.1 is
    assert _run(s, [0.5, 0.53, 0.63, 0.66, 0.67], key="val/mIoU") == [False, False, False, False, True]
    assert s.best == pytest.approx(0.63)


def test_nan_never_improves() -> None:
    s = EarlyStopper.from_section({"patience": 2})
    assert s is not None
    assert _run(s, [math.nan, math.nan]) == [False, True]
    assert s.best is None


def test_state_round_trip_continues_the_count() -> None:
    a = EarlyStopper.from_section({"patience": 3})
    assert a is not None
    _run(a, [1.0, 1.1, 1.2])  # two bad validations
    b = EarlyStopper.from_section({"patience": 3})
    assert b is not None
    b.load_state_dict(a.state_dict())
    assert b.update({"val/loss": 1.3}) is True  # the third bad one, counted across the "resume"
    c = EarlyStopper.from_section({"metric": "val/mIoU", "mode": "max", "patience": 3})
    assert c is not None
    c.load_state_dict(a.state_dict())  # another metric: the count starts afresh
    assert (c.best, c.bad) == (None, 0)


def test_absent_section_and_errors() -> None:
    assert EarlyStopper.from_section(None) is None
    with pytest.raises(EarlyStopError, match=r"train\.early_stop\.patience"):
        EarlyStopper.from_section({"patience": 0})
    with pytest.raises(EarlyStopError, match=r"train\.early_stop\.metrc"):
        EarlyStopper.from_section({"metrc": "val/loss"})
    s = EarlyStopper.from_section({"metric": "val/miou"})
    assert s is not None
    with pytest.raises(EarlyStopError, match=r"val/miou.*reports \['val/loss'"):
        s.update({"val/loss": 1.0})
