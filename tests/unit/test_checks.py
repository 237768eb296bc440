"""The one "whole number, not a bool, in range" check, and the places that use it."""

from __future__ import annotations

import pytest

from encdec.config.checks import check_int, int_problem, is_number


def test_message_names_field_value_allowed_and_fix() -> None:
    with pytest.raises(ValueError) as err:
        check_int(True, "FCNDecoder: num_convs")
    assert str(err.value) == "FCNDecoder: num_convs must be an int >= 1, got True (a bool); fix: write a whole number >= 1"
    assert int_problem(5, "cluster.slurm.signal_grace_s", minimum=10, maximum=65535) == (
        "cluster.slurm.signal_grace_s must be an int >= 10 and <= 65535, got 5 (out of range); "
        "fix: write a whole number >= 10 and <= 65535"
    )
    with pytest.raises(ValueError, match=r"got '3' \(a str\); fix: use 3$"):
        check_int("3", "n", fix="use 3")


@pytest.mark.parametrize("value", [0, -1, 1.0, 2.5, True, False, "1", None, [1]])
def test_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got "):
        check_int(value, "n")


def test_accepted_and_options() -> None:
    assert check_int(3, "n") == 3 and check_int(0, "n", minimum=0) == 0 and check_int(-5, "n", minimum=None) == -5
    assert check_int(2.0, "n", whole_floats=True) == 2 and isinstance(check_int(2.0, "n", whole_floats=True), int)
    assert check_int(None, "n", optional=True) is None
    with pytest.raises(ValueError, match=r"n must be an int >= 1 or None, got 0"):
        check_int(0, "n", optional=True)
    with pytest.raises(KeyError):
        check_int(11, "n", maximum=10, error=KeyError)
    assert is_number(1) and is_number(0.5) and not is_number(True) and not is_number("1")


def test_constructors_refuse_a_bool_count() -> None:
    from encdec.distributed.deepspeed_config import deepspeed_config
    from encdec.distributed.strategy import StrategyError
    from encdec.models.decoders.fcn import FCNDecoder
    from encdec.models.necks import MaxpoolToPyramidal

    with pytest.raises(ValueError, match=r"FCNDecoder: num_convs must be an int >= 1, got True \(a bool\)"):
        FCNDecoder([8], num_convs=True)
    with pytest.raises(ValueError, match=r"MaxpoolToPyramidal: kernel_size must be an int >= 1, got 2.0 \(a float\)"):
        MaxpoolToPyramidal([8], kernel_size=2.0)  # type: ignore[arg-type]
    with pytest.raises(StrategyError, match=r"optim.grad_accum must be an int >= 1, got True"):
        deepspeed_config({}, zero_stage=2, precision="fp32", grad_accum=True, micro_batch=1, grad_clip=None)
