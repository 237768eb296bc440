"""The official Prithvi-EO-2.0 fine-tuning configs' ``model_args`` (copied verbatim into ``prithvi_configs/``, see
each file's header) build with ``build_model`` on the meta device, and every key is honoured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from encdec.models.factory import build_model

CONFIGS = Path(__file__).parent / "prithvi_configs"
TASKS = {
    "terratorch.tasks.SemanticSegmentationTask": "segmentation",
    "terratorch.tasks.PixelwiseRegressionTask": "regression",
}
# the configs leave the backbone as <prithvi_model>; their SelectIndices comments pair indices with a size
BACKBONE = {"firescars": "prithvi_eo_v2_600", "burnintensity": "prithvi_eo_v2_600_tl", "landslide": "prithvi_eo_v2_600",
            "biomassters": "prithvi_eo_v2_600", "sen1floods11": "prithvi_eo_v2_300", "multicrop": "prithvi_eo_v2_300"}


def _load(name: str) -> tuple[str, dict[str, Any]]:
    doc = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert doc["model_factory"] == "EncoderDecoderFactory"
    args = dict(doc["model_args"])
    assert args["backbone"] == "<prithvi_model>"
    args["backbone"] = BACKBONE[name]
    return TASKS[doc["task_class"]], args


@pytest.mark.parametrize("name", sorted(BACKBONE))
def test_official_model_args_build_on_meta_and_are_honoured(name: str) -> None:
    task, args = _load(name)
    with torch.device("meta"):
        model = build_model(task, **args)
    enc = model.encoder
    frames = args.get("backbone_num_frames", 1)
    assert enc.num_frames == frames and enc.in_chans == len(args["backbone_bands"])
    assert enc.pending_checkpoint is not None if args["backbone_pretrained"] else enc.pending_checkpoint is None
    coords = args.get("backbone_coords_encoding")
    if coords is not None:
        assert enc.temporal_encoding == ("time" in coords) and enc.location_encoding == ("location" in coords)
    assert [enc.out_indices[i] for i in model.neck[0].indices] == args["necks"][0]["indices"]
    assert model.neck[1].effective_time_dim == args["necks"][1].get("effective_time_dim", 1)
    assert model.decoder.out_channels == args["decoder_channels"]
    assert model.decoder.scale_modules == args.get("decoder_scale_modules", False)
    assert model.rescale is True
    head = model.head
    assert type(head.dropout) is (nn.Dropout if task == "segmentation" else nn.Dropout2d) and head.dropout.p == 0.1
    convs = [m.out_channels for m in head.hidden if isinstance(m, nn.Conv2d)]
    assert convs == args.get("head_channel_list", [])
    if task == "segmentation":
        assert head.final.out_channels == args["num_classes"]
    # a dummy batch's shape goes through (what the planner checks before any cluster)
    shape = (1, len(args["backbone_bands"]), *([frames] if frames > 1 else []), 224, 224)
    with torch.device("meta"):
        out = model.eval()(torch.empty(shape)).output
    assert out.shape == ((1, args["num_classes"], 224, 224) if task == "segmentation" else (1, 224, 224))


def test_terratorch_options_not_implemented_are_refused_by_name() -> None:
    task, args = _load("sen1floods11")
    from encdec.models.factory import FactoryError

    with torch.device("meta"), pytest.raises(FactoryError, match=r"'vit_adapter' \(vit_adapter: TerraTorch options not implemented here\)"):
        build_model(task, **args, backbone_vit_adapter=True)
    with torch.device("meta"), pytest.raises(ValueError, match=r"in_chans=7 and in_channels=6 disagree"):
        build_model(task, **args, backbone_in_chans=7, backbone_in_channels=6)



def test_recipe_check_gives_the_same_reason_for_a_terratorch_option_not_implemented() -> None:
    from encdec.launcher.preflight.static_checks import static_checks
    from encdec.launcher.recipe.validate import recipe_from_dict

    task, args = _load("sen1floods11")
    bands = args["backbone_bands"]
    recipe = recipe_from_dict({
        "task": task, "model": {**args, "backbone_vit_adapter": True},
        "data": {"train": {"tiles": "/nowhere"}, "bands": bands, "means": [0.0] * len(bands),
                 "stds": [1.0] * len(bands), "global_batch_size": 2}, "train": {"max_steps": 1}})
    said = [i.message for i in static_checks(recipe)]
    assert any("'vit_adapter' (vit_adapter: TerraTorch options not implemented here)" in m for m in said), said


@pytest.mark.parametrize("name", sorted(BACKBONE))
def test_official_model_args_plan_as_a_recipe_model_section(name: str) -> None:
    """What ``encdec-launch RECIPE --dry-run`` does with the block pasted as ``model:``: the recipe validates
    (every key accepted by the schema) and the planner builds it on meta and pushes a dummy batch through."""
    from encdec.launcher.preflight.plan import make_plan
    from encdec.launcher.recipe.validate import recipe_from_dict

    task, args = _load(name)
    bands = args["backbone_bands"]
    frames = args.get("backbone_num_frames", 1)
    recipe = recipe_from_dict({
        "task": task, "model": args,
        "data": {"train": {"tiles": "/nowhere"}, "bands": bands, "means": [0.0] * len(bands),
                 "stds": [1.0] * len(bands), "img_size": 224, "num_frames": frames, "global_batch_size": 2},
        "train": {"max_steps": 1, "precision": "fp32"},
    })
    plan = make_plan(recipe)
    k = args["num_classes"] if task == "segmentation" else 1
    assert plan.input_shape == (2, len(bands), *([frames] if frames > 1 else []), 224, 224)
    assert plan.output_shape[0] == 2 and plan.output_shape[-2:] == (224, 224) and k >= 1
