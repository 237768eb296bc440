"""``encdec-launch predict`` / ``evaluate`` as subprocesses on an export folder of a tiny Prithvi + UperNet model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

SCRIPT = Path(sys.executable).parent / "encdec-launch"
REPO = Path(__file__).resolve().parents[2]
BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
BLOCK = {"backbone": "prithvi_eo_tiny", "backbone_pretrained": False, "backbone_img_size": 32,
         "backbone_bands": BANDS, "necks": [{"name": "SelectIndices", "indices": [1, 3]},
                                            {"name": "ReshapeTokensToImage"}],
         "decoder": "FCNDecoder", "decoder_channels": 16, "num_classes": 3}


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{SCRIPT.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def write_export(root: Path) -> Path:
    """An export folder as `encdec-launch export` writes it (model.yaml + model.safetensors), seeded weights."""
    import torch
    from safetensors.torch import save_file

    from encdec.models import build_model

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = build_model("segmentation", **BLOCK)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "model.safetensors"))
    # the scene's bands are unnamed: dataset_bands names them, as a training recipe must for such files
    doc = {"task": "segmentation", "model": BLOCK, "data": {"bands": BANDS, "dataset_bands": BANDS, "img_size": 32}}
    (root / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit._predict_models import write_scene

    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    data = rng.integers(200, 4000, size=(6, 70, 90)).astype(np.uint16)
    data[:, :, :6] = 0  # a nodata border, as Landsat/Sentinel scenes have
    return write_scene(root / "scene_a.tif", data, nodata=0)


def test_predict_help_imports_neither_torch_nor_ray() -> None:
    probe = ("import sys\nfrom encdec.launcher import cli\n"
             "try:\n    cli.main(['predict', '--help'])\nexcept SystemExit:\n    pass\n"
             "import encdec\nprint('HEAVY', sorted(m for m in ('torch', 'ray', 'rasterio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONPATH": str(REPO)})
    assert "HEAVY []" in out.stdout and "--probabilities" in out.stdout and "--dry-run" in out.stdout


def test_dry_run_lists_windows_sizes_and_memory(export_dir: Path, scene: Path, tmp_path: Path) -> None:
    out = _cli("predict", str(export_dir), str(scene), "-o", str(tmp_path / "out"), "--dry-run")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("scene_a"))
    assert "70x90" in line and "to do" in line and "MiB" in line
    assert "crop 32x32" in out.stdout
    assert not (tmp_path / "out" / "scene_a.tif").exists()


def test_predict_then_evaluate(export_dir: Path, scene: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    _cli("predict", str(export_dir), str(scene), "-o", str(out_dir), "--probabilities", "--set", "tiled.stride=24")
    with rasterio.open(scene) as src, rasterio.open(out_dir / "scene_a.tif") as dst:
        assert (dst.crs, dst.transform, dst.shape) == (src.crs, src.transform, src.shape)
        cls = dst.read(1)
        tags = dst.tags()
    assert (cls[:, :6] == 255).all() and (cls[:, 6:] < 3).all()
    assert tags["tiled_w_stride"] == "24" and tags["model"] == str(export_dir) and len(tags["recipe_sha256"]) == 16
    assert (out_dir / "scene_a_probabilities.tif").exists() and (out_dir / "scene_a.png").exists()
    again = _cli("predict", str(export_dir), str(scene), "-o", str(out_dir))
    assert "already done" in again.stdout

    ref = tmp_path / "ref.tif"
    with rasterio.open(out_dir / "scene_a.tif") as src:
        profile = src.profile
        truth = src.read(1).copy()
    truth[truth != 255] = np.where(np.arange(truth[truth != 255].size) % 4 == 0, 0, truth[truth != 255])
    with rasterio.open(ref, "w", **{**profile, "driver": "GTiff"}) as dst:
        dst.write(truth, 1)
    ev = _cli("evaluate", str(export_dir), "--scenes", str(scene), "--references", str(ref), "-o", str(out_dir))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    pred = cls[cls != 255]
    assert metrics["pixels"] == pred.size
    assert abs(metrics["accuracy"] - float((pred == truth[cls != 255]).mean())) < 1e-9
    assert (out_dir / "confusion_matrix.png").exists() and (out_dir / "metrics.csv").exists()
    assert "mIoU" in ev.stdout


def test_evaluate_checks_the_references_before_predicting_and_dry_runs(export_dir: Path, scene: Path,
                                                                        tmp_path: Path) -> None:
    from tests.unit._predict_models import write_scene

    wrong = write_scene(tmp_path / "wrong.tif", np.zeros((1, 70, 80), np.uint8))  # 10 columns short
    out_dir = tmp_path / "out"
    bad = _cli("evaluate", str(export_dir), "--scenes", str(scene), "--references", str(wrong), "-o", str(out_dir),
               check=False)
    assert bad.returncode != 0 and "wrong.tif (70x80" in bad.stderr and "scene_a.tif (70x90" in bad.stderr
    assert "Fix:" in bad.stderr and not (out_dir / "scene_a.tif").exists()  # refused before predicting
    right = write_scene(tmp_path / "right.tif", np.zeros((1, 70, 90), np.uint8))
    dry = _cli("evaluate", str(export_dir), "--scenes", str(scene), "--references", str(right), "-o", str(out_dir),
               "--dry-run")
    assert "references on their scenes' grids" in dry.stdout and "right.tif: 70x90" in dry.stdout
    assert "to do" in dry.stdout and not (out_dir / "scene_a.tif").exists() and not (out_dir / "metrics.json").exists()


def test_bad_model_argument_is_a_clear_error(scene: Path, tmp_path: Path) -> None:
    out = _cli("predict", str(tmp_path), str(scene), "-o", str(tmp_path / "o"), check=False)
    assert out.returncode == 3 and "neither a run directory" in out.stderr and "Fix:" in out.stderr


@pytest.mark.ray
def test_two_ray_workers_on_the_local_cluster_write_the_same_bytes(export_dir: Path, scene: Path,
                                                                   tmp_path: Path) -> None:
    # the CLI starts the launcher's local Ray cluster (as training does), runs 2 workers, stops the cluster
    _cli("predict", str(export_dir), str(scene), "-o", str(tmp_path / "two"), "--workers", "2", "--strip-rows", "20",
         "--no-quicklook")
    _cli("predict", str(export_dir), str(scene), "-o", str(tmp_path / "one"), "--strip-rows", "20", "--no-quicklook")
    assert (tmp_path / "two" / "scene_a.tif").read_bytes() == (tmp_path / "one" / "scene_a.tif").read_bytes()


def test_run_directory_gives_recipe_settings_and_a_clear_error_without_checkpoint(tmp_path: Path) -> None:
    from encdec.launcher.commands.predict_cmd import load_run_model, resolve_model, tiled_from
    from encdec.launcher.recipe.errors import LaunchError

    (tmp_path / "recipe.yaml").write_text((REPO / "recipes" / "quickstart.yaml").read_text())
    spec = resolve_model(str(tmp_path))
    assert spec.data is not None and (spec.kind, spec.task, spec.img_size) == ("run", "segmentation", 64)
    assert spec.data.bands == BANDS and len(spec.data.stats()[0]) == 6
    tiled = tiled_from(spec, ["tiled.delta=2", "data.img_size=64"], None).resolve()
    assert (tiled.h_crop, tiled.h_stride, tiled.delta) == (64, 56, 2)
    with pytest.raises(LaunchError, match="no complete checkpoint"):
        load_run_model(spec)
