"""Search spaces: the four forms parse without running code, bad forms and bounds are named, every key is checked
against the recipe schema (each choice, both ends of a range) before any trial starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from encdec.launcher.commands.tune_space import parse_search_args, parse_space, validate_spaces
from encdec.launcher.commands.tune_trial import apply_values
from encdec.launcher.recipe.errors import LaunchError

REPO = Path(__file__).resolve().parents[2]
QUICK = str(REPO / "recipes" / "quickstart.yaml")


def test_forms_and_probes() -> None:
    assert parse_space("optim.lr", "choice(1e-9, 1e-3)").probes() == [1e-9, 1e-3]
    assert parse_space("data.global_batch_size", "choice(8,16, 32)").args == (8, 16, 32)
    assert parse_space("optim.lr", "loguniform(1e-5, 1e-3)").probes() == [1e-5, 1e-3]
    assert parse_space("optim.warmup_steps", "randint(0, 10)").probes() == [0, 9]  # hi excluded
    assert parse_space("loss.name", "choice('ce', 'dice')").args == ("ce", "dice")
    d = parse_space("optim.lr", "uniform(0.1, 0.2)").domain()
    assert 0.1 <= d.sample() <= 0.2


@pytest.mark.parametrize("text, words", [
    ("normal(0, 1)", ["choice(a, b, ...)"]),
    ("choice()", ["at least one"]),
    ("uniform(1)", ["two numbers"]),
    ("loguniform(0, 1)", ["0 < lo < hi"]),
    ("randint(1.5, 3)", ["integers"]),
    ("uniform(2, 1)", ["lo < hi"]),
    ("choice(__import__('os').getcwd())", ["literals"]),
])
def test_bad_spaces(text: str, words: list[str]) -> None:
    with pytest.raises(LaunchError) as err:
        parse_space("k", text)
    for w in words:
        assert w in str(err.value)


def test_search_args() -> None:
    assert parse_search_args(["optim.lr=choice(1, 2)", " a.b = uniform(0,1) "]) == {
        "optim.lr": "choice(1, 2)", "a.b": "uniform(0,1)"}
    with pytest.raises(LaunchError, match="KEY=SPACE"):
        parse_search_args(["optim.lr"])


def test_keys_are_validated_against_the_schema_all_at_once() -> None:
    ok = validate_spaces(QUICK, [], {"optim.lr": "loguniform(1e-5, 1e-3)", "train.strategy": "choice('ddp', 'fsdp')"})
    assert [s.key for s in ok] == ["optim.lr", "train.strategy"]
    with pytest.raises(LaunchError) as err:
        validate_spaces(QUICK, [], {"optim.lrr": "choice(1e-3)", "optim.lr": "choice(1e-3, 20)",
                                    "train.strategy": "choice('ddp', 'zero')", "optim.warmup_steps": "randint(-3, 2)"})
    text = str(err.value)
    assert "optim.lrr" in text and "Did you mean 'lr'" in text
    assert "optim.lr='choice(1e-3, 20)'" in text and "20" in text  # lr <= 10
    assert "'zero'" in text and "fsdp" in text
    assert "optim.warmup_steps" in text and "-3" in text


def test_apply_values_sets_nested_keys_on_a_copy() -> None:
    base = {"optim": {"lr": 1.0}, "train": {"max_steps": 5}}
    out = apply_values(base, {"optim.lr": 0.5, "train.early_stop.patience": 3})
    assert out == {"optim": {"lr": 0.5}, "train": {"max_steps": 5, "early_stop": {"patience": 3}}}
    assert base["optim"]["lr"] == 1.0
