"""``--init-from``: TerraTorch (Lightning) checkpoints are read without TerraTorch installed, bad ones fail before any
cluster starts (missing, unreadable, not this model), and a good one is what the workers start from. The same run
(``encdec-launch`` on the shared local Ray cluster) then stalls and ends ``early-stopped``: early stopping through
the real driver, its best checkpoint exported and MLflow told. MLflow and TensorBoard read back after a resume are
checked on the Ctrl-C-then-resume run of test_launcher_faults.py; that a down MLflow server stops nothing on the
finishing run of test_real_rasters.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from launcher_testlib import REPO, launch, quick_args, run_dirs

BIAS = 10.0  # head bias +-BIAS: every pixel predicts water with a logit margin of 2 * BIAS
MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"


def _write_lightning_ckpt(tmp_path: Path) -> Path:
    """A checkpoint shaped like Lightning's, whose hyper-parameters pickle a class of a package that then vanishes."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "fake_terratorch_tasks.py").write_text("class SemanticSegmentationTaskHParams:\n    pass\n")
    ckpt = tmp_path / "epoch=3.ckpt"
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(pkg)!r})
        from fake_terratorch_tasks import SemanticSegmentationTaskHParams
        h = SemanticSegmentationTaskHParams(); h.lr = 1e-4
        torch.save({{"epoch": 3, "global_step": 120, "hyper_parameters": {{"task": h}},
                    "state_dict": {{"model.encoder.patch_embed.proj.weight": torch.ones(4, 6, 1, 16, 16),
                                    "model.head.head.weight": torch.zeros(2, 8), "criterion.weight": torch.ones(2)}},
                    "optimizer_states": []}}, {str(ckpt)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    return ckpt


def _quickstart_ckpt(path: Path, *, head_bias: float | None = None, num_classes: int = 2,
                     extra_key: str | None = None) -> Path:
    """A TerraTorch Lightning checkpoint of the quickstart recipe's model (``state_dict`` under ``model.``).

    ``head_bias``: zero the last conv's weight and give it biases (-b, +b), so the model predicts water (class 1)
    everywhere with a known logit margin whatever its features are.
    """
    import torch

    from encdec.launcher.recipe.validate import load_recipe
    from encdec.models import build_model

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"model.num_classes={num_classes}"])
    torch.manual_seed(123)
    state = build_model(recipe.task, **recipe.model.factory_kwargs()).state_dict()
    if head_bias is not None:
        state["head.final.weight"] = torch.zeros_like(state["head.final.weight"])
        state["head.final.bias"] = torch.tensor([-head_bias, head_bias])
    if extra_key:
        state[extra_key] = torch.ones(3)
    torch.save({"epoch": 9, "global_step": 400, "state_dict": {f"model.{k}": v for k, v in state.items()},
                "hyper_parameters": {"model_args": recipe.model.factory_kwargs(), "task": recipe.task}}, path)
    return path


def _fails_early(out: subprocess.CompletedProcess[str], storage: Path, *texts: str) -> None:
    assert out.returncode == 3, out.stderr[-3000:]
    for text in texts:
        assert text in out.stderr, (text, out.stderr[-3000:])
    assert "starting a local Ray cluster" not in out.stdout
    assert not storage.exists() or not run_dirs(storage)


def test_terratorch_checkpoint_reads_without_terratorch(tmp_path: Path) -> None:
    ckpt = _write_lightning_ckpt(tmp_path)
    # a fresh interpreter that cannot import the pickled class's module
    code = ("from encdec.models.terratorch_ckpt import read_checkpoint\n"
            f"sd = read_checkpoint({str(ckpt)!r})\nprint(sorted(sd), tuple(sd['head.head.weight'].shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "['encoder.patch_embed.proj.weight', 'head.head.weight'] (2, 8)" in out.stdout


def test_init_from_missing_file_fails_before_any_cluster(quick_tiles: Path, tmp_path: Path) -> None:
    out = launch(quick_args(quick_tiles, tmp_path / "runs", "--init-from", str(tmp_path / "nope.ckpt")), timeout=300)
    _fails_early(out, tmp_path / "runs", "--init-from", "nope.ckpt", "no such file")


def test_init_from_unreadable_file_fails_before_any_cluster(quick_tiles: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.ckpt"
    bad.write_text("this is not a checkpoint\n")
    out = launch(quick_args(quick_tiles, tmp_path / "runs", "--init-from", str(bad)), timeout=300)
    _fails_early(out, tmp_path / "runs", "notes.ckpt", "cannot be read as a checkpoint", "torch.save")


def test_init_from_checkpoint_of_another_model_names_the_keys(quick_tiles: Path, tmp_path: Path) -> None:
    # 3 classes instead of 2 (head shapes differ) plus a key the quickstart model does not have
    ckpt = _quickstart_ckpt(tmp_path / "three_classes.ckpt", num_classes=3, extra_key="aux_heads.extra.weight")
    out = launch(quick_args(quick_tiles, tmp_path / "runs", "--init-from", str(ckpt)), timeout=300)
    _fails_early(out, tmp_path / "runs", "three_classes.ckpt", "does not fit the recipe's model", "head.final.weight",
                 "aux_heads.extra.weight", "fix:")


def _first_loss(run_dir: Path) -> dict[str, Any]:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            return row
    raise AssertionError(f"no train/loss in {run_dir / 'metrics.jsonl'}")


def _land_fractions(tiles: Path) -> list[float]:
    """Per train tile: the fraction of labelled pixels that are land (class 0)."""
    import rasterio

    out = []
    for path in sorted((tiles / "train").glob("*_mask.tif")):
        with rasterio.open(path) as src:
            mask = src.read(1)
        out.append(float((mask == 0).sum() / max(1, (mask >= 0).sum())))
    assert out, f"no masks under {tiles / 'train'}"
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_run_starts_from_the_checkpoint_then_stalls_and_stops_early(ray_cluster: object, quick_tiles: Path,
                                                                    tmp_path: Path) -> None:
    """2 workers on the shared cluster; the checkpoint's head says 'water' everywhere with margin 2 * BIAS, so the
    first step's loss is 2 * BIAS x the batch's land fraction (random init: ~0.7), and the workers were started
    with the malloc threshold. At lr 1e-9 the run then stalls: it ends ``early-stopped`` (status.json, metrics.csv,
    MLflow) with its best checkpoint exported. (One launch for both: each costs 30-60 s.)"""
    from mlflow.tracking import MlflowClient

    ckpt = _quickstart_ckpt(tmp_path / "epoch=9-step=400.ckpt", head_bias=BIAS)
    storage = tmp_path / "runs"
    args = quick_args(quick_tiles, storage, "--address", ray_cluster.gcs_address,  # type: ignore[attr-defined]
                      "--init-from", str(ckpt), "--set", "train.max_steps=40", "--set", "train.log_every=1",
                      "--set", "train.val_every=2", "--set", "train.ckpt_every=100", "--set", "optim.lr=1e-9",
                      "--set", "optim.warmup_steps=0",
                      "--set", "train.early_stop={metric: val/loss, mode: min, patience: 2, min_delta: 0.01}",
                      "--set", "track.mlflow.experiment=stall")
    out = launch(args, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = run_dirs(storage)
    first = _first_loss(run_dir)
    assert first["step"] == 1
    # the logits are the bias alone: per labelled pixel the loss is softplus(2 * BIAS) = 2 * BIAS on land, ~0 on
    # water; a batch's land fraction lies between its tiles' (image nodata may drop a few more pixels: 5 % slack)
    fractions = _land_fractions(quick_tiles)
    low, high = 2 * BIAS * min(fractions) * 0.95, 2 * BIAS * max(fractions) * 1.05
    assert low <= first["train/loss"] <= high, (first["train/loss"], low, high)
    assert first["train/loss"] > 10 * 0.7  # far from a random head's ~ln 2
    expected = os.environ.get(MALLOC_ENV, "131072")
    for rank in (0, 1):
        record = json.loads((run_dir / "workers" / f"rank{rank}.json").read_text())
        assert record["malloc_mmap_threshold"] == expected, record

    # val/loss best at step 2, no better by min_delta at 4 and 6 (patience 2): stopped at step 6 of 40
    assert "early-stopped" in out.stdout
    status = json.loads((run_dir / "status.json").read_text())  # issue 17: why it ended, in the run directory
    assert status["state"] == "early-stopped" and status["step"] == 6 and status["early_stop"]["metric"] == "val/loss"
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert rows[-1]["step"] == "6" and rows[-1]["status"] == "early-stopped"
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()
    assert (run_dir / "export" / "model.safetensors").is_file()  # the best checkpoint was exported
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    run = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}").get_run(run_id)
    assert run.data.tags["encdec.status"] == "early-stopped" and run.info.status == "FINISHED"
