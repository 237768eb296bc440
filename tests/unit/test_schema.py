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
    assert set(schema["properties"]) == {"task", "run", "model", "loss", "data", "optim", "train", "cluster", "track", "tune"}
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


# --------------------------------------------------------------------------- the engine's options, end to end
def _engine_keys() -> dict[str, set[str]]:
    """The keys the engine reads from each section (its own allow-lists, which reject anything else)."""
    from dataclasses import fields

    from encdec.train import loop_parts, losses, optim

    renamed = {"best_metric_name": "best_metric", "best_mode_name": "best_mode"}
    train = {renamed.get(f.name, f.name) for f in fields(loop_parts.LoopConfig)} | loop_parts._LAUNCHER_KEYS
    return {"loss": set(losses._KEYS), "optim": set(optim._KEYS), "train": train}


def test_schema_and_engine_accept_the_same_keys() -> None:
    from encdec.launcher.schema import LossSection, OptimSection, TrainSection

    schema = {"loss": set(LossSection.model_fields), "optim": set(OptimSection.model_fields),
              "train": set(TrainSection.model_fields)}
    engine = _engine_keys()
    for section in ("loss", "optim", "train"):
        assert schema[section] - engine[section] == set(), f"{section}: the schema accepts keys the engine rejects"
        assert engine[section] - schema[section] == set(), f"{section}: engine keys a recipe cannot reach"


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

    from encdec.train.loop_parts import LoopConfig
    from encdec.train.losses import build_loss
    from encdec.train.optim import build_optimizer, check_optim_cfg

    recipe = _full_recipe()
    for section in ("loss", "optim", "train"):  # as written (the other optimizer's defaults ride along unread)
        sent = recipe.section(section)
        assert {k: sent[k] for k in FULL_OPTIONS[section]} == FULL_OPTIONS[section]
        assert set(sent) - set(FULL_OPTIONS[section]) <= {"momentum", "nesterov"}
    cfg = LoopConfig.from_section(recipe.section("train"))
    assert (cfg.log_every, cfg.freeze_backbone, cfg.freeze_decoder, cfg.adapter_only, cfg.reshard_after_forward) == (
        3, True, True, False, False)
    assert cfg.best_metric("segmentation") == "val/IoU_1" and cfg.best_mode("segmentation") == "min"
    opts = cfg.strategy_options(recipe.section("model"), recipe.section("data"), 2, 2)
    assert (opts["reshard_after_forward"], opts["build_on_rank0"]) == (False, False)
    loss = build_loss("segmentation", recipe.section("loss"))
    assert loss.terms == ("ce", "dice") and loss.term_weights.tolist() == [1.0, 0.5]
    assert (loss.dice_smooth, loss.aux_weights, loss.ignore_index) == (0.25, {"aux": 0.3}, 255)
    check_optim_cfg(recipe.section("optim"))
    opt = build_optimizer(torch.nn.Linear(2, 2), recipe.section("optim"))
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["fused"]) == ((0.8, 0.95), 1e-6, None)
    sgd = recipe_from_dict({**MINIMAL, "optim": {"name": "sgd", "momentum": 0.5, "nesterov": True}})
    group = build_optimizer(torch.nn.Linear(2, 2), sgd.section("optim")).param_groups[0]
    assert (group["momentum"], group["nesterov"]) == (0.5, True)
    huber = recipe_from_dict({**MINIMAL, "task": "regression", "loss": {"name": "huber", "huber_delta": 0.2},
                              "model": {**MINIMAL["model"], "num_classes": 1}})
    assert build_loss("regression", huber.section("loss")).huber_delta == 0.2


def test_resolved_recipes_validate_again() -> None:
    # a run directory's recipe.yaml spells out every default: no option rule may trip on those
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe_from_dict(recipe.to_yaml_dict()).section("optim") == recipe.section("optim")
    full = _full_recipe()
    assert recipe_from_dict(full.to_yaml_dict()).section("train") == full.section("train")


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
