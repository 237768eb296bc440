"""``encdec-launch`` as a subprocess: --help (fast, no torch), recipe errors, --dry-run of every shipped recipe,
``plan --json``, ``recipe --schema`` and ``convert-terratorch`` (no Ray cluster needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from launcher_testlib import REPO, launch

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SCRIPT = Path(sys.executable).parent / "encdec-launch"

GOOD = yaml.safe_load(textwrap.dedent("""
    task: segmentation
    model: {backbone: prithvi_eo_tiny, decoder: FCNDecoder, num_classes: 2}
    data: {train: {tiles: /data/train}, global_batch_size: 4}
    train: {max_steps: 10}
"""))


def test_help_is_fast_and_imports_neither_torch_nor_ray() -> None:
    probe = ("import sys\nfrom encdec.launcher import cli\n"
             "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "try:\n    cli.main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'ray', 'rasterio', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert "HEAVY []" in out.stdout
    assert "--dry-run" in out.stdout and "--simulate-nodes" in out.stdout and "--resume" in out.stdout
    best = min(_timed([str(SCRIPT), "--help"]) for _ in range(3))
    assert best < 1.0, f"encdec-launch --help took {best:.2f} s"


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, timeout=60, check=True)
    return time.perf_counter() - start


def test_version_and_schema() -> None:
    out = launch(["--version"], timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("encdec-launch ")
    out = launch(["recipe", "--schema"], timeout=60)
    schema = json.loads(out.stdout)
    assert schema["properties"]["train"] and "description" in schema["$defs"]["TrainSection"]["properties"]["strategy"]


def _bad(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _with(**changes: object) -> dict:
    doc = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


BAD_RECIPES: dict[str, tuple[object, list[str]]] = {
    "yaml_syntax": ("task: segmentation\nmodel:\n  backbone: x\n   decoder: y\n", ["is not valid YAML", ".yaml:4"]),
    "unknown_section": (_with(trian={"max_steps": 1}), ["trian", "is not a recipe key", "Did you mean 'train'"]),
    "misspelt_key": (_with(optim={"lerning_rate": 0.1}), ["optim.lerning_rate", "Allowed here:", "lr"]),
    "task_typo": (_with(task="segmentaion"), ["task", "Did you mean 'segmentation'?"]),
    "bad_strategy": (_with(train__strategy="fsdp2"), ["train.strategy", "use one of none, ddp, fsdp, deepspeed",
                                                      "Did you mean 'fsdp'?"]),
    "negative_lr": (_with(optim={"lr": -0.001}), ["optim.lr", "greater than 0", "got -0.001"]),
    "missing_data": (_with(data=None), ["data (", "is required", "add `data: ...`"]),
    "no_length": (_with(train__max_steps=None), ["train.max_steps", "give exactly one of train.max_steps or "
                                                 "train.epochs"]),
    "two_sources": (_with(data__train={"tiles": "/a", "manifest": "/b.csv"}),
                    ["data.train", "exactly one of 'tiles', 'manifest', 'scenes' or 'image_root'"]),
    "stats_length": (_with(data__means=[1.0, 2.0]), ["data.means", "has 2 values but data.bands has 6",
                                                    "encdec-launch stats"]),
    "batch_not_divisible": (_with(cluster={"workers_per_node": 3}), ["data.global_batch_size", "not divisible by "
                                                                    "workers (3)", "multiple of 3"]),
    "loss_task": (_with(loss={"name": "mse"}), ["loss.name", "does not fit task 'segmentation'",
                                               "use one of ce, dice, ce_dice"]),
    "no_num_classes": (_with(model__num_classes=None), ["model.num_classes", "needs the number of classes"]),
    "unprefixed_model_key": (_with(model__pretrained=True), ["model.pretrained", "not a build_model argument",
                                                             "prefix it with backbone_"]),
    "class_weights": (_with(loss={"class_weights": [1, 2, 3]}), ["loss.class_weights", "has 3 weights but "
                                                                 "model.num_classes is 2"]),
    "band_order": (_with(model__backbone_bands=["RED", "GREEN", "BLUE", "NIR_NARROW", "SWIR_1", "SWIR_2"]),
                   ["model.backbone_bands", "differs from data.bands"]),
    "none_with_workers": (_with(train__strategy="none", cluster={"workers_per_node": 2}),
                          ["train.strategy", "'none' runs a single process"]),
    "custom_bands_no_stats": (_with(data__bands=["B02", "B03"]), ["data.means", "default statistics exist only"]),
    "precision_typo": (_with(train__precision="bf_16"), ["train.precision", "Did you mean 'bf16'"]),
}


@pytest.mark.parametrize("name", sorted(BAD_RECIPES))
def test_bad_recipe_messages(name: str, tmp_path: Path) -> None:
    data, expected = BAD_RECIPES[name]
    path = _bad(tmp_path, name, data)
    out = launch(["recipe", str(path)], timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    for text in expected:
        assert text in out.stderr, f"{text!r} not in:\n{out.stderr}"
    assert "fix:" in out.stderr


def test_all_errors_at_once_with_lines(tmp_path: Path) -> None:
    path = _bad(tmp_path, "many", _with(task="segmentaion", optim={"lr": -1, "grad_acum": 2},
                                        train__strategy="dpp"))
    out = launch(["recipe", str(path)], timeout=60)
    assert "has 4 problems" in out.stderr
    lines = path.read_text().splitlines()
    lr_line = next(i for i, line in enumerate(lines, 1) if "lr:" in line)
    assert f"many.yaml:{lr_line})" in out.stderr


def test_set_and_flag_errors_name_their_source(tmp_path: Path) -> None:
    path = _bad(tmp_path, "good", GOOD)
    out = launch(["plan", str(path), "--set", "optim.lr=abc", "--set", "train.max_step=3", "--set", "oops",
                  "--nodes", "0"], timeout=120)
    assert out.returncode == 2
    for text in ("--set optim.lr=abc", "--set train.max_step=3", "Did you mean 'max_steps'?", "has no '='",
                 "cluster.nodes (--nodes 0)"):
        assert text in out.stderr, f"{text!r} not in:\n{out.stderr}"


def test_registry_names_checked_by_the_plan(tmp_path: Path) -> None:
    path = _bad(tmp_path, "names", _with(model__decoder="UperNetDecodr", model__necks=[{"name": "SelectIndex"}],
                                         model__backbone="prithvi_eo_v2_30"))
    out = launch([str(path), "--dry-run"], timeout=300)
    assert out.returncode == 2
    for text in ("model.backbone", "Did you mean 'prithvi_eo_v2_300'", "model.decoder", "Did you mean 'UperNetDecoder'",
                 "model.necks[0].name", "Did you mean 'SelectIndices'?", "names.yaml:"):
        assert text in out.stderr, f"{text!r} not in:\n{out.stderr}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_dry_run_every_shipped_recipe(path: Path) -> None:
    out = launch([str(path.relative_to(REPO)), "--dry-run"], timeout=300)
    data = yaml.safe_load(path.read_text())["data"]["train"]
    # recipes for cluster data (/shared/...) print their plan, then fail the data check on a machine without it
    missing = "synthetic" not in data and not Path(data.get("tiles") or data.get("manifest")).exists()
    assert out.returncode == (3 if missing else 0), out.stdout + out.stderr
    if missing:
        assert "error: the data cannot be used" in out.stderr and "data.train." in out.stderr, out.stderr
    for text in ("parameters", "estimated memory per worker", "ScalingConfig", "num_workers=", "FailureConfig",
                 "planned in"):
        assert text in out.stdout, f"{text!r} not in:\n{out.stdout}"
    assert not list(REPO.glob("runs/*-<timestamp>"))  # a dry run creates nothing


def test_dry_run_checks_the_data_paths(tmp_path: Path) -> None:
    """A nonexistent tiles path fails --dry-run (rc 3, naming the key and the path), before any cluster starts."""
    out = launch(["recipes/quickstart.yaml", "--dry-run", "--set", "data.train.synthetic=null",
                  "--set", f"data.train.tiles={tmp_path / 'nothere'}"], timeout=300)
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"data.train.tiles='{tmp_path / 'nothere'}' matches no files" in out.stderr, out.stderr


def test_dry_run_300m_at_8_nodes_with_slurm() -> None:
    start = time.perf_counter()
    out = launch(["recipes/prithvi_lora.yaml", "--nodes", "8", "--dry-run", "--slurm"], timeout=300)
    wall = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    # the script alone on stdout (`--slurm --dry-run > job.sbatch`); the plan and the launch spec on stderr
    assert out.stdout.startswith("#!") and "#SBATCH --nodes=8" in out.stdout and "num_workers" not in out.stdout
    assert "num_workers=64" in out.stderr and "placement_strategy=SPREAD" in out.stderr and "fits" in out.stderr
    planned = float(out.stderr.split("planned in ")[1].split(" s")[0])
    # the time is reported, not asserted (benchmarks measure speed; a shared CI machine only adds noise)
    print(f"dry run of prithvi_lora at --nodes 8: plan {planned:.2f} s, whole command {wall:.1f} s")


def test_plan_json(tmp_path: Path) -> None:
    out = launch(["plan", "recipes/prithvi_600_zero3.yaml", "--json"], timeout=300)
    plan = json.loads(out.stdout)
    assert plan["world_size"] == 64 and plan["chosen"] == "zero3" and plan["activation_checkpointing"]
    by = {e["strategy"]: e for e in plan["estimates"]}
    assert by["zero3"]["total_ckpt"] < by["ddp"]["total"]


TERRATORCH_CONFIG = """
seed_everything: 42
trainer:
  accelerator: gpu
  strategy: deepspeed_stage_3
  devices: 4
  num_nodes: 2
  precision: bf16-mixed
  max_epochs: 50
  log_every_n_steps: 10
  accumulate_grad_batches: 2
  gradient_clip_val: 0.5
  default_root_dir: /shared/terratorch_runs
  callbacks:
    - class_path: lightning.pytorch.callbacks.RichProgressBar
data:
  class_path: terratorch.datamodules.GenericNonGeoSegmentationDataModule
  init_args:
    batch_size: 8
    num_workers: 8
    constant_scale: 1.0
    dataset_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
    output_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
    rgb_indices: [2, 1, 0]
    train_data_root: /data/sen1floods11/train
    train_label_data_root: /data/sen1floods11/train
    val_data_root: /data/sen1floods11/val
    val_label_data_root: /data/sen1floods11/val_labels
    img_grep: "*_S2Hand.tif"
    label_grep: "*_LabelHand.tif"
    means: [1087, 1342, 1433, 2734, 1958, 1363]
    stds: [2248, 2179, 2178, 1850, 1242, 1049]
    num_classes: 2
    no_label_replace: -1
model:
  class_path: terratorch.tasks.SemanticSegmentationTask
  init_args:
    model_factory: EncoderDecoderFactory
    model_args:
      backbone: prithvi_eo_v2_300
      backbone_pretrained: true
      backbone_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
      necks:
        - {name: SelectIndices, indices: [5, 11, 17, 23]}
        - {name: ReshapeTokensToImage}
        - {name: LearnedInterpolateToPyramidal}
      decoder: UperNetDecoder
      head_dropout: 0.1
      num_classes: 2
      peft_config:
        method: LORA
        replace_qkv: qkv
        peft_config_kwargs: {target_modules: [qkv.q_linear, qkv.v_linear], r: 16, lora_alpha: 16}
    loss: ce
    ignore_index: -1
    class_weights: [0.3, 0.7]
    freeze_backbone: false
    plot_on_val: false
optimizer:
  class_path: torch.optim.AdamW
  init_args: {lr: 1.0e-4, weight_decay: 0.05}
lr_scheduler:
  class_path: ReduceLROnPlateau
  init_args: {monitor: val/loss}
"""


def test_convert_terratorch(tmp_path: Path) -> None:
    cfg = tmp_path / "sen1floods11.yaml"
    cfg.write_text(TERRATORCH_CONFIG)
    out_path = tmp_path / "recipe.yaml"
    out = launch(["convert-terratorch", str(cfg), "-o", str(out_path)], timeout=120)
    assert out.returncode == 0, out.stderr
    recipe = yaml.safe_load(out_path.read_text())
    source = yaml.safe_load(TERRATORCH_CONFIG)["model"]["init_args"]["model_args"]
    assert recipe["model"] == source  # model_args pasted in unchanged
    assert recipe["task"] == "segmentation" and recipe["run"]["seed"] == 42
    assert recipe["loss"] == {"name": "ce", "ignore_index": -1, "class_weights": [0.3, 0.7]}
    assert recipe["train"] == {"freeze_backbone": False, "epochs": 50, "precision": "bf16", "log_every": 10,
                               "strategy": "deepspeed", "zero_stage": 3}
    assert recipe["optim"] == {"name": "adamw", "lr": 1e-4, "weight_decay": 0.05, "grad_accum": 2, "grad_clip": 0.5,
                               "schedule": "plateau", "plateau": {"metric": "val/loss"}}  # ReduceLROnPlateau
    assert recipe["cluster"] == {"nodes": 2, "workers_per_node": 4, "gpus_per_worker": 1,
                                 "storage": "/shared/terratorch_runs"}
    assert recipe["data"]["global_batch_size"] == 64  # 8 per device x 4 devices x 2 nodes
    assert recipe["data"]["train"] == {"image_root": "/data/sen1floods11/train", "image_glob": "*_S2Hand.tif",
                                       "label_root": "/data/sen1floods11/train", "label_glob": "*_LabelHand.tif"}
    assert recipe["data"]["val"]["label_root"] == "/data/sen1floods11/val_labels"  # labels in another folder
    assert recipe["data"]["dataset_bands"] == recipe["data"]["bands"] and recipe["data"]["no_label_replace"] == -1
    text = out_path.read_text()
    for unmapped in ("RichProgressBar", "val_labels", "plot_on_val", "num_workers"):
        assert unmapped in text, unmapped
    check = launch(["recipe", str(out_path)], timeout=60)
    assert check.returncode == 0, check.stderr
