"""The ``track:`` section and ``train.early_stop``: typed, documented, no credentials, storage rule, in the run's
resolved recipe."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from encdec.launcher.recipe.errors import RecipeError
from encdec.launcher.recipe.validate import recipe_from_dict

MINIMAL: dict[str, Any] = {
    "task": "segmentation",
    "model": {"backbone": "prithvi_eo_tiny", "decoder": "FCNDecoder", "num_classes": 2},
    "data": {"train": {"tiles": "/data/train"}, "global_batch_size": 4},
    "train": {"max_steps": 10},
}


def _with(**sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name].update(value)
        else:
            data[name] = value
    return data


def test_track_section_is_typed_and_in_the_resolved_recipe() -> None:
    recipe = recipe_from_dict(_with(track={"tensorboard": True, "mlflow": {"experiment": "floods"},
                                           "wandb": {"project": "p"}}))
    assert recipe.track is not None and recipe.track.mlflow is not None
    assert recipe.track.mlflow.experiment == "floods" and recipe.track.wandb.mode == "offline"  # type: ignore[union-attr]
    dumped = recipe.to_yaml_dict()
    assert list(dumped)[-1] == "track" and dumped["track"]["tensorboard"] is True
    assert "track" not in recipe_from_dict(MINIMAL).to_yaml_dict()  # unset: the run's recipe.yaml stays as before
    assert recipe_from_dict(dumped).track == recipe.track  # the run's recipe.yaml loads back the same


@pytest.mark.parametrize("bad, words", [
    ({"mlflow": {"tracking_uri": "https://alice:hunter2@mlflow.example.com"}}, ["credentials", "MLFLOW_TRACKING_PASSWORD"]),
    ({"mlflow": {"tracking_uri": "http://h:5000?token=abc"}}, ["credentials"]),
    ({"mlflow": {"tags": {"api_token": "x"}}}, ["look like credentials"]),
    ({"mlfow": {}}, ["track.mlfow", "mlflow"]),
    ({"wandb": {"project": "p", "mode": "sometimes"}}, ["track.wandb.mode", "offline"]),
    ({"wandb": {"project": "p", "api_key": "k"}}, ["track.wandb.api_key"]),
])
def test_bad_track_sections_are_named(bad: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_with(track=bad))
    text = str(err.value)
    for w in words:
        assert w in text, text


def test_embedded_mlflow_needs_a_disk_not_an_object_store() -> None:
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_with(track={"mlflow": {}}, cluster={"storage": "s3://bucket/runs"}))
    text = str(err.value)
    assert "track.mlflow.tracking_uri" in text and "s3://bucket/runs" in text and "object store" in text
    ok = recipe_from_dict(_with(track={"mlflow": {"tracking_uri": "http://mlflow:5000"}},
                                cluster={"storage": "s3://bucket/runs"}))
    assert ok.track is not None


def test_early_stop_section() -> None:
    recipe = recipe_from_dict(_with(train={"early_stop": {"metric": "val/mIoU", "mode": "max", "patience": 2}},
                                    data={"val": {"tiles": "/data/val"}}))  # a stop rule needs validation
    assert recipe.train.early_stop is not None
    assert recipe.train.early_stop.model_dump() == {"metric": "val/mIoU", "mode": "max", "patience": 2,
                                                     "min_delta": 0.0}
    assert recipe_from_dict(MINIMAL).train.early_stop is None
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_with(train={"early_stop": {"patience": 0}}))
    assert "train.early_stop.patience" in str(err.value)
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_with(train={"early_stop": {"mode": "up"}}))
    assert "train.early_stop.mode" in str(err.value)
