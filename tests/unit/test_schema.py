"""Recipe schema: every shipped recipe validates, every field is documented, errors carry path/line/value/fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from encdec.config import DataSection, LossSection
from encdec.launcher.recipe.errors import RecipeError
from encdec.launcher.recipe.overrides import OverrideError, parse_override, parse_path
from encdec.launcher.recipe.schema import Recipe, json_schema
from encdec.launcher.recipe.validate import load_recipe, recipe_from_dict

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
    # the sections the other packages receive are the typed objects of encdec.config
    assert isinstance(recipe.data, DataSection) and recipe.data.feed in ("reader", "ray")
    assert recipe.data.split("train") is not None


def test_every_field_is_described() -> None:
    seen: set[type[BaseModel]] = set()
    _models(Recipe, seen)
    assert len(seen) >= 12
    missing = [f"{cls.__name__}.{name}" for cls in seen for name, info in cls.model_fields.items()
               if not (info.description and len(info.description) > 8)]
    assert missing == []


def test_json_schema_has_every_section() -> None:
    schema = json_schema()
    assert set(schema["properties"]) == {"task", "run", "model", "loss", "data", "optim", "train", "cluster", "track", "tune"}
    json.dumps(schema)


def test_minimal_recipe_and_defaults() -> None:
    r = recipe_from_dict(MINIMAL)
    assert r.train.strategy == "ddp" and r.cluster.world_size == 1
    assert r.model.factory_kwargs() == {"backbone": "prithvi_eo_tiny", "decoder": "FCNDecoder", "num_classes": 2,
                                        "rescale": True}
    assert r.loss == LossSection()  # the per-task defaults apply
    assert (r.loss.name_for("segmentation"), r.loss.ignore_index_for("segmentation")) == ("ce", -1)
    assert (r.loss.name_for("regression"), r.loss.ignore_index_for("regression")) == ("mse", None)
    assert r.train.pg_timeout_s == 1800


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
    out = recipe_from_dict(data).model.factory_kwargs()
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
    assert r.model.factory_kwargs()["necks"] == [{"name": "SelectIndices", "indices": [0]}]


# --------------------------------------------------------------------------- the engine's options, end to end
FULL_OPTIONS: dict[str, Any] = {
    "loss": {"name": "ce_dice", "ignore_index": 255, "class_weights": [1.0, 3.0], "dice_weight": 0.5,
             "dice_smooth": 0.25, "aux_weights": {"aux": 0.3}},
    "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.1, "betas": [0.8, 0.95], "eps": 1e-6, "fused": False,
              "schedule": "cosine", "warmup_steps": 3, "min_lr": 1e-5, "grad_clip": 0.5, "grad_accum": 2},
    "train": {"max_steps": 10, "precision": "fp32", "strategy": "fsdp", "zero_stage": 2,
              "activation_checkpointing": True, "compile": False, "log_every": 3, "val_every": 4, "ckpt_every": 5,
              "keep_last": 2, "best_metric": "val/IoU_1", "best_mode": "min", "freeze_backbone": True,
              "freeze_decoder": True, "adapter_only": False, "reshard_after_forward": False, "build_on_rank0": False,
              "max_failures": 1},
}


def _full_recipe() -> Recipe:
    data = json.loads(json.dumps(MINIMAL))
    data["model"]["aux_decoders"] = [{"name": "aux", "decoder": "FCNDecoder"}]
    data["data"]["val"] = {"tiles": "/data/val"}
    data.update(json.loads(json.dumps(FULL_OPTIONS)))
    return recipe_from_dict(data)


def test_every_option_reaches_the_engine_as_written() -> None:
    import torch

    from encdec.train.loop_parts import strategy_options
    from encdec.train.losses import build_loss
    from encdec.train.optim import build_optimizer

    recipe = _full_recipe()
    for section in ("loss", "optim", "train"):  # as written (the other optimizer's defaults ride along unread)
        sent = getattr(recipe, section).model_dump(mode="json")
        assert {k: sent[k] for k in FULL_OPTIONS[section]} == FULL_OPTIONS[section]
    cfg = recipe.train
    assert (cfg.log_every, cfg.freeze_backbone, cfg.freeze_decoder, cfg.adapter_only, cfg.reshard_after_forward) == (
        3, True, True, False, False)
    assert cfg.best_metric_for("segmentation") == "val/IoU_1" and cfg.best_mode_for("segmentation") == "min"
    opts = strategy_options(cfg, peft=False, global_batch_size=recipe.data.global_batch_size, grad_accum=2,
                            world_size=2)
    assert (opts["reshard_after_forward"], opts["build_on_rank0"]) == (False, False)
    loss = build_loss("segmentation", recipe.loss)
    assert loss.terms == ("ce", "dice") and loss.term_weights.tolist() == [1.0, 0.5]
    assert (loss.dice_smooth, loss.aux_weights, loss.ignore_index) == (0.25, {"aux": 0.3}, 255)
    opt = build_optimizer(torch.nn.Linear(2, 2), recipe.optim)
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["fused"]) == ((0.8, 0.95), 1e-6, None)
    sgd = recipe_from_dict({**MINIMAL, "optim": {"name": "sgd", "momentum": 0.5, "nesterov": True}})
    group = build_optimizer(torch.nn.Linear(2, 2), sgd.optim).param_groups[0]
    assert (group["momentum"], group["nesterov"]) == (0.5, True)
    huber = recipe_from_dict({**MINIMAL, "task": "regression", "loss": {"name": "huber", "huber_delta": 0.2},
                              "model": {**MINIMAL["model"], "num_classes": 1}})
    assert build_loss("regression", huber.loss).huber_delta == 0.2


def test_resolved_recipes_validate_again() -> None:
    # a run directory's recipe.yaml spells out every default: no option rule may trip on those
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe_from_dict(recipe.to_yaml_dict()).optim == recipe.optim
    full = _full_recipe()
    assert recipe_from_dict(full.to_yaml_dict()).train == full.train


def test_option_rules_name_the_key_and_the_fix() -> None:
    bad = json.loads(json.dumps(MINIMAL))
    bad["model"]["aux_decoders"] = [{"name": "aux_fcn", "decoder": "FCNDecoder"}]
    bad["loss"] = {"name": "ce", "dice_weight": 2.0, "huber_delta": 1.0, "aux_weights": {"aux_fnc": 0.5}}
    bad["optim"] = {"name": "adamw", "momentum": 0.8}
    bad["train"]["best_metric"] = "miou"
    bad["train"]["reshard_after_forward"] = False
    err = _issues(bad)
    assert set(err.paths()) == {"loss.dice_weight", "loss.huber_delta", "loss.aux_weights.aux_fnc", "optim.momentum",
                                "train.best_metric", "train.reshard_after_forward"}
    text = str(err)
    assert "set loss.name to ce_dice" in text and "set loss.name to huber" in text
    assert "Did you mean 'aux_fcn'?" in text and "Did you mean 'val/mIoU'?" in text
    assert "set optim.name: sgd" in text and "set train.strategy: fsdp" in text
    err = _issues({**MINIMAL, "optim": {"betas": [0.9, 1.5]}})  # a schema error (cross-field rules wait for it)
    assert err.paths() == ["optim.betas"] and "each beta must be in [0, 1)" in str(err)
    bad["optim"] = {"name": "sgd", "momentum": 0.0, "nesterov": True, "eps": 1e-6, "schedule": "constant",
                    "min_lr": 1e-3, "lr": 1e-4}
    bad["loss"] = {"name": "ce"}
    bad["train"] = {"max_steps": 3, "best_metric": "val/mIoU"}
    err = _issues(bad)
    assert set(err.paths()) == {"optim.nesterov", "optim.eps", "optim.min_lr", "train.best_metric"}
    text = str(err)
    assert "needs momentum > 0" in text and "is above optim.lr" in text and "set optim.schedule: cosine" in text
    assert "data.val is not set" in text


def test_new_option_typos_get_did_you_mean() -> None:
    bad = json.loads(json.dumps(MINIMAL))
    bad["optim"] = {"fuse": False, "nesterow": True}
    bad["loss"] = {"dice_wieght": 1.0}
    bad["train"]["log_evry"] = 5
    text = str(_issues(bad))
    for wrong, right in (("fuse", "fused"), ("nesterow", "nesterov"), ("dice_wieght", "dice_weight"),
                         ("log_evry", "log_every")):
        assert f"Did you mean '{right}'" in text, wrong


def test_round1_run_recipes_still_load() -> None:
    """A run directory written before the typed config (tests/unit/fixtures/round1_run, made by commit 00ab3bc)
    keeps a recipe.yaml that loads, with the fields added since at their defaults."""
    for run in ("lora", "full"):
        recipe = load_recipe(Path(__file__).parent / "fixtures" / "round1_run" / run / "recipe.yaml")
        assert recipe.train.max_steps == 4 and recipe.train.pg_timeout_s == 1800
        assert (recipe.model.peft_config is not None) == (run == "lora")


def test_terratorch_num_outputs_and_image_size_out() -> None:
    """TerraTorch regression blocks say ``num_outputs``; ``image_size_out`` is a build_model argument too."""
    model = {**MINIMAL["model"], "num_outputs": 1, "image_size_out": [48, 40]}
    model.pop("num_classes", None)
    recipe = recipe_from_dict({**MINIMAL, "task": "regression", "model": model})
    assert recipe.model.num_classes == 1 and recipe.model.image_size_out == (48, 40)
    assert "num_outputs" not in recipe.model.factory_kwargs()
    with pytest.raises(RecipeError, match="num_outputs=1 and num_classes=2 are both given"):
        recipe_from_dict({**MINIMAL, "model": {**MINIMAL["model"], "num_outputs": 1, "num_classes": 2}})
