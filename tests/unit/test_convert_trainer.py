"""``convert-terratorch``, the trainer side: EarlyStopping -> train.early_stop, loggers -> track:, ReduceLROnPlateau ->
the plateau schedule, on small configs written here and on the eight official Prithvi-EO-2.0 configs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from encdec.config import OptimSection
from encdec.config.early_stop import EarlyStopConfig
from encdec.config.track import TrackConfig
from encdec.launcher.commands.convert_terratorch import convert
from encdec.launcher.commands.convert_trainer import map_metric, split_trainer_side

OFFICIAL = Path(__file__).parent / "fixtures" / "prithvi_eo2_configs"
# the official configs' EarlyStopping patience (None: no EarlyStopping callback)
OFFICIAL_PATIENCE = {"biomassters": 20, "burnintensity": None, "firescars": 20, "landslide": 10, "multicrop": 20,
                     "sen1floods11": 20, "sen4map_crops": None, "sen4map_land-cover": None}

CONFIG: dict[str, Any] = yaml.safe_load("""
seed_everything: 0
trainer:
  max_epochs: 3
  check_val_every_n_epoch: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.EarlyStopping
      init_args: {monitor: val/Multiclass_Jaccard_Index, mode: max, patience: 4, min_delta: 0.01, verbose: true,
                  divergence_threshold: 5.0}
    - class_path: ModelCheckpoint
      init_args: {monitor: val/mIoU, mode: max, save_top_k: 2, every_n_train_steps: 100}
    - class_path: LearningRateMonitor
    - class_path: StochasticWeightAveraging
      init_args: {swa_lrs: 0.01}
  logger:
    - class_path: TensorBoardLogger
      init_args: {save_dir: /logs, name: floods, log_graph: true}
    - class_path: lightning.pytorch.loggers.MLFlowLogger
      init_args: {experiment_name: floods, run_name: r1, tracking_uri: "http://mlflow:5000", tags: {team: eo, n: 1},
                  log_model: true}
    - class_path: WandbLogger
      init_args: {project: eo, entity: lab, offline: true, save_dir: /tmp/wandb}
    - class_path: CSVLogger
      init_args: {save_dir: /logs}
    - class_path: CometLogger
data:
  class_path: terratorch.datamodules.GenericNonGeoSegmentationDataModule
  init_args:
    batch_size: 4
    dataset_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
    output_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]
    train_data_root: /data/train
    train_label_data_root: /data/train
    val_data_root: /data/val
    val_label_data_root: /data/val
    img_grep: "*_img.tif"
    label_grep: "*_mask.tif"
    means: [1, 2, 3, 4, 5, 6]
    stds: [1, 1, 1, 1, 1, 1]
    num_classes: 2
model:
  class_path: terratorch.tasks.SemanticSegmentationTask
  init_args:
    model_factory: EncoderDecoderFactory
    model_args: {backbone: prithvi_eo_tiny, backbone_pretrained: false, decoder: FCNDecoder, num_classes: 2,
                 backbone_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]}
    loss: ce
optimizer:
  class_path: torch.optim.AdamW
  init_args: {lr: 1.0e-4}
lr_scheduler:
  class_path: ReduceLROnPlateau
  init_args: {monitor: val/Multiclass_Jaccard_Index, mode: max, factor: 0.5, patience: 2, cooldown: 1,
              threshold: 0.001, threshold_mode: abs, min_lr: 1.0e-6, eps: 1.0e-8, verbose: false}
""")


@pytest.mark.parametrize(("theirs", "ours", "noted"), [
    ("val/loss", "val/loss", False),
    ("val_loss", "val/loss", False),  # Lightning's older underscore style
    ("val/Multiclass_Jaccard_Index", "val/mIoU", False),  # TerraTorch 0.99
    ("val/mIoU", "val/mIoU", False),  # TerraTorch >= 1.0
    ("val/Pixel_Accuracy", "val/accuracy", False),
    ("val/Multiclass_Accuracy", "val/accuracy", False),
    ("val/Accuracy", "val/mAcc", False),  # macro in TerraTorch >= 1.0
    ("val/Overall_Accuracy", "val/accuracy", False),
    ("val/IoU_1", "val/IoU_1", False),
    ("val/multiclassjaccardindex_0", "val/IoU_0", False),
    ("val/RMSE", "val/rmse", False),
    ("val/MSE", "val/rmse", True),
    ("val/F1_Score", None, True),
    ("train/loss", None, True),
])
def test_metric_names(theirs: str, ours: str | None, noted: bool) -> None:
    got, note = map_metric(theirs)
    assert got == ours and (note is not None) == noted


def test_small_config_maps_every_part_and_lists_the_rest() -> None:
    rest, side = split_trainer_side(CONFIG)
    assert CONFIG["trainer"]["callbacks"]  # the caller's config is left as it was
    assert "callbacks" not in rest["trainer"] and "logger" not in rest["trainer"] and "lr_scheduler" not in rest
    assert side.train == {"early_stop": {"metric": "val/mIoU", "mode": "max", "patience": 4, "min_delta": 0.01},
                          "best_metric": "val/mIoU", "best_mode": "max", "ckpt_every": 100}
    assert side.optim == {"schedule": "plateau", "min_lr": 1e-6,
                          "plateau": {"metric": "val/mIoU", "mode": "max", "factor": 0.5, "patience": 2,
                                      "threshold": 0.001, "threshold_mode": "abs", "cooldown": 1}}
    assert side.track == {"tensorboard": "/logs/floods",
                          "mlflow": {"tracking_uri": "http://mlflow:5000", "experiment": "floods", "run_name": "r1",
                                     "tags": {"team": "eo", "n": "1"}},
                          "wandb": {"project": "eo", "entity": "lab", "mode": "offline"}}
    text = "\n".join(side.notes)
    for listed in ("divergence_threshold", "save_top_k", "StochasticWeightAveraging", "LearningRateMonitor",
                   "log_graph", "log_model", "WandbLogger save_dir", "CSVLogger", "CometLogger",
                   "check_val_every_n_epoch=1"):
        assert listed in text, listed
    assert "verbose=" not in text and "eps=" not in text  # no effect on the decision: not worth a note


def test_converted_recipe_validates_with_the_typed_sections() -> None:
    from encdec.launcher.recipe.validate import recipe_from_dict

    recipe, notes, _ = convert(CONFIG)
    typed = recipe_from_dict(recipe)
    assert typed.train.early_stop == EarlyStopConfig(metric="val/mIoU", mode="max", patience=4, min_delta=0.01)
    assert typed.optim.schedule == "plateau" and typed.optim.plateau is not None
    assert (typed.optim.plateau.metric, typed.optim.plateau.factor, typed.optim.min_lr) == ("val/mIoU", 0.5, 1e-6)
    assert typed.track is not None and typed.track.mlflow is not None and typed.track.wandb is not None
    assert typed.track.tensorboard == "/logs/floods" and typed.track.mlflow.experiment == "floods"
    assert not any("trainer.callbacks:" in n or "trainer.logger:" in n or "no equivalent; using a constant" in n
                   for n in notes)  # no longer reported as unmapped by the data/model side


def test_terratorch_task_scheduler_maps_without_an_optimizer_block() -> None:
    config = copy.deepcopy(CONFIG)
    for key in ("optimizer", "lr_scheduler"):
        del config[key]
    config["model"]["init_args"].update(scheduler="ReduceLROnPlateau",
                                        scheduler_hparams={"factor": 0.2, "patience": 5, "interval": "step"})
    rest, side = split_trainer_side(config)
    assert side.optim == {"schedule": "plateau", "plateau": {"metric": "val/loss", "factor": 0.2, "patience": 5}}
    assert "scheduler" not in rest["model"]["init_args"] and "scheduler_hparams" not in rest["model"]["init_args"]
    assert any("interval 'step'" in n for n in side.notes)
    # with an optimizer: block, LightningCLI replaces the task's configure_optimizers: its scheduler never ran
    config["optimizer"] = CONFIG["optimizer"]
    rest, side = split_trainer_side(config)
    assert side.optim == {} and any("not used by TerraTorch either" in n for n in side.notes)


def test_odd_values_are_notes_never_errors() -> None:
    config = {"trainer": {"callbacks": [{"class_path": "EarlyStopping", "init_args": {"monitor": "val/F1_Score"}},
                                        {"class_path": "EarlyStopping", "init_args": {"monitor": "val/loss",
                                                                                      "patience": 0}},
                                        "RichProgressBar", {"not": "a callback"}],
                          "logger": {"class_path": "MLFlowLogger",
                                     "init_args": {"tracking_uri": "http://user:pw@mlflow:5000"}}},
              "lr_scheduler": {"class_path": "ReduceLROnPlateau", "init_args": {"monitor": "train/loss"}}}
    _, side = split_trainer_side(config)
    # the first EarlyStopping watched a metric we lack, so the second (patience 0 -> 1) is the one mapped
    assert side.train == {"early_stop": {"metric": "val/loss", "mode": "min", "patience": 1}}
    assert side.track == {"mlflow": {}}  # credentials never reach the recipe
    assert side.optim == {}  # nothing to watch: the schedule stays what the rest of the converter says
    text = "\n".join(side.notes)
    for listed in ("val/F1_Score", "patience 0", "RichProgressBar", "{'not': 'a callback'}", "credentials",
                   "ReduceLROnPlateau not mapped"):
        assert listed in text, listed
    assert split_trainer_side({"trainer": {"logger": True}})[1].track == {"tensorboard": True}
    assert split_trainer_side({"trainer": {"logger": False}})[1].track == {}
    wandb = split_trainer_side({"trainer": {"logger": {"class_path": "WandbLogger"}}})[1]
    assert wandb.track == {"wandb": {"project": "lightning_logs", "mode": "online"}}  # Lightning's defaults
    assert any("WANDB_API_KEY" in n for n in wandb.notes)
    TrackConfig.model_validate(wandb.track)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PATIENCE))
def test_official_prithvi_configs(name: str) -> None:
    config = yaml.safe_load((OFFICIAL / f"{name}.yaml").read_text())
    _, side = split_trainer_side(config)
    patience = OFFICIAL_PATIENCE[name]
    expected_train: dict[str, Any] = {}
    if patience is not None:
        expected_train["early_stop"] = {"metric": "val/loss", "mode": "min", "patience": patience}
    if name.startswith("sen4map"):  # ModelCheckpoint(monitor=val/loss) and ReduceLROnPlateau(monitor=val/loss)
        expected_train.update(best_metric="val/loss", best_mode="min")
        assert side.optim == {"schedule": "plateau", "plateau": {"metric": "val/loss"}}
        plateau = OptimSection.model_validate(side.optim).plateau
        assert plateau is not None and (plateau.factor, plateau.patience) == (0.1, 10)  # torch's defaults
    else:
        assert side.optim == {}  # CosineAnnealingLR / StepLR: the rest of the converter's business
    assert side.train == expected_train
    if "early_stop" in side.train:
        EarlyStopConfig.model_validate(side.train["early_stop"])
    # TensorBoardLogger(save_dir=<your_dir>) and `logger: True` both mean TensorBoard in the run directory
    assert side.track == {"tensorboard": True}
    text = "\n".join(side.notes)
    assert "RichProgressBar" in text and "LearningRateMonitor" in text and "check_val_every_n_epoch" in text
    recipe, notes, _ = convert(config)
    assert recipe["track"] == {"tensorboard": True}
    assert all(recipe["train"][k] == v for k, v in expected_train.items())
    assert not any(n.startswith(("trainer.callbacks:", "trainer.logger:")) for n in notes)
