"""Recipe schema: every shipped recipe validates, every field is documented, errors carry path/line/value/fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from encdec.launcher.errors import RecipeError
from encdec.launcher.overrides import OverrideError, parse_override, parse_path
from encdec.launcher.schema import Recipe, json_schema, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

MINIMAL: dict[str, Any] = {
    "task": "segmentation",
    "model": {"backbone": "prithvi_eo_tiny", "decoder": "FCNDecoder", "num_classes": 2},
    "data": {"train": {"tiles": "/data/train"}, "global_batch_size": 4},
    "train": {"max_steps": 10},
}


def _models(cls: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if cls in seen:
        return
    seen.add(cls)
    for info in cls.model_fields.values():
        for arg in [info.annotation, *getattr(info.annotation, "__args__", ())]:
            for inner in [arg, *getattr(arg, "__args__", ())]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    _models(inner, seen)


def test_shipped_recipes_exist() -> None:
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "prithvi_lora", "prithvi_600_zero3"} <= names
    assert len(RECIPES) >= 6


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.model.backbone
    # the sections the other packages read are plain dicts with the shared names
    assert set(recipe.section("data")) >= {"train", "bands", "img_size", "global_batch_size"}
    assert recipe.section("data")["feed"] in ("reader", "ray")


def test_every_field_is_described() -> None:
    seen: set[type[BaseModel]] = set()
    _models(Recipe, seen)
    assert len(seen) >= 12
    missing = [f"{cls.__name__}.{name}" for cls in seen for name, info in cls.model_fields.items()
               if not (info.description and len(info.description) > 8)]
    assert missing == []


def test_json_schema_has_every_section() -> None:
    schema = json_schema()
    assert set(schema["properties"]) == {"task", "run", "model", "loss", "data", "optim", "train", "cluster"}
    json.dumps(schema)


def test_minimal_recipe_and_defaults() -> None:
    r = recipe_from_dict(MINIMAL)
    assert r.train.strategy == "ddp" and r.cluster.world_size == 1
    assert r.section("model") == {"backbone": "prithvi_eo_tiny", "decoder": "FCNDecoder", "num_classes": 2,
                                  "rescale": True}
    assert r.section("loss") == {}  # the engine's per-task defaults apply


def test_terratorch_model_args_paste_in_unchanged() -> None:
    model_args = {
        "backbone": "prithvi_eo_v2_300", "backbone_pretrained": True, "backbone_bands": ["BLUE", "GREEN"],
        "necks": [{"name": "SelectIndices", "indices": [5, 11, 17, 23]}, {"name": "ReshapeTokensToImage"}],
        "decoder": "UperNetDecoder", "decoder_channels": 256, "head_dropout": 0.1, "num_classes": 2,
        "peft_config": {"method": "LORA", "replace_qkv": "qkv",
                        "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 16}},
    }
    data = {**MINIMAL, "model": model_args, "data": {**MINIMAL["data"], "bands": ["BLUE", "GREEN"],
                                                     "means": [1, 2], "stds": [1, 2]}}
    out = recipe_from_dict(data).section("model")
    assert {k: out[k] for k in model_args} == model_args


def _issues(data: dict[str, Any]) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    return info.value


def test_errors_are_collected_with_did_you_mean() -> None:
    bad = json.loads(json.dumps(MINIMAL))
    bad["train"]["strategy"] = "fsdpp"
    bad["optim"] = {"lrr": 1e-3, "grad_accum": 0}
    bad["model"]["num_class"] = 3
    err = _issues(bad)
    assert set(err.paths()) == {"train.strategy", "optim.lrr", "optim.grad_accum", "model.num_class"}
    text = str(err)
    assert "Did you mean 'fsdp'?" in text and "Did you mean 'lr'?" in text and "Did you mean 'num_classes'?" in text
    assert "has 4 problems" in text


def test_cross_section_rules() -> None:
    bad = json.loads(json.dumps(MINIMAL))
    bad["loss"] = {"name": "mse"}
    bad["data"]["global_batch_size"] = 5
    bad["cluster"] = {"workers_per_node": 2}
    bad["model"]["backbone_bands"] = ["RED"]
    err = _issues(bad)
    assert set(err.paths()) == {"loss.name", "data.global_batch_size", "model.backbone_bands"}
    assert "multiple of 2 (e.g. 4 or 6)" in str(err)


def test_line_numbers_and_override_sources(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL, sort_keys=False) + "extra_section: 1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["optim.lr=-1", "train.max_stepz=3"])
    issues = {".".join(map(str, i.path)): i for i in info.value.issues}
    assert issues["extra_section"].line == len(path.read_text().splitlines())
    assert issues["optim.lr"].source == "--set optim.lr=-1"
    assert issues["train.max_stepz"].source == "--set train.max_stepz=3"
    assert "Did you mean 'max_steps'?" in issues["train.max_stepz"].fix


def test_override_parsing() -> None:
    assert parse_override("optim.lr=1e-4") == (("optim", "lr"), 1e-4)
    assert parse_override("model.necks[0].indices=[1, 2]") == (("model", "necks", 0, "indices"), [1, 2])
    assert parse_override("train.compile=true") == (("train", "compile"), True)
    assert parse_path("model.necks.1.name") == ("model", "necks", 1, "name")
    for bad in ("optim.lr", "=3", "a..b=1", "x=[1,"):
        with pytest.raises(OverrideError):
            parse_override(bad)


def test_override_typed_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    r = load_recipe(path, ["optim.lr=3e-4", "train.max_steps=7", "model.necks=[{name: SelectIndices, indices: [0]}]"],
                    flags={"cluster.nodes": 2, "data.global_batch_size": 8})
    assert r.optim.lr == 3e-4 and r.train.max_steps == 7 and r.cluster.nodes == 2
    assert r.section("model")["necks"] == [{"name": "SelectIndices", "indices": [0]}]
