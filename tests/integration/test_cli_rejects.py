"""``encdec-launch`` as a subprocess, given what a user gets wrong: each is refused with a short error on stderr
(rc 2 for input, 3 for a launch that cannot proceed), never a traceback, and leaves nothing behind.

Cheap on purpose: nothing here starts Ray; most commands return before torch is imported. The sbatch rejection
submits to the real local Slurm (tests/cluster/local-slurm.sh), which refuses the job at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from launcher_testlib import REPO, launch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from slurm_testlib import ensure_local_slurm

RECIPE = {
    "task": "segmentation",
    "model": {"backbone": "prithvi_eo_tiny", "decoder": "FCNDecoder", "num_classes": 2, "backbone_img_size": 32},
    "data": {"train": {"tiles": "/data/train"}, "img_size": 32, "global_batch_size": 2},
    "train": {"max_steps": 4},
}


def _refused(out: object, rc: int, *texts: str, lines: int | None = 1) -> None:
    stdout, stderr, code = out.stdout, out.stderr, out.returncode  # type: ignore[attr-defined]
    assert code == rc, f"rc {code}\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr + stdout, stderr
    for text in texts:
        assert text in stderr, f"{text!r} not in:\n{stderr}"
    if lines is not None:
        assert len(stderr.strip().splitlines()) == lines, stderr


@pytest.mark.parametrize(("flags", "expected"), [
    (["--slurm", "--k8s"], "--slurm and --k8s both name the launch target"),
    (["--submit"], "--submit sends the run as a Ray Job to an existing cluster: give its dashboard"),
    (["--partition", "gpu", "--time", "1:00:00"], "--partition, --time are Slurm flags: add --slurm"),
    (["--k8s", "--address", "auto"], "--k8s starts its own Ray cluster; drop --address"),
])
def test_contradicting_flags(flags: list[str], expected: str) -> None:
    _refused(launch(["recipes/quickstart.yaml", "--dry-run", *flags], timeout=60), 2, expected)


@pytest.mark.parametrize("kind", ["directory", "tif", "binary", "duplicate_key"])
def test_recipe_that_is_not_a_recipe(kind: str, tmp_path: Path) -> None:
    if kind == "directory":
        path, expected = tmp_path, "is a directory"
    elif kind == "tif":
        path, expected = REPO / "tests/data/real/RGB.byte.tif", "is a TIFF/GeoTIFF image, not YAML text"
    elif kind == "binary":
        path, expected = tmp_path / "model.yaml", "is a binary file, not YAML text"
        path.write_bytes(b"task: x\x00\x01\x02" * 10)
    else:
        path = tmp_path / "dup.yaml"
        text = yaml.safe_dump(RECIPE, sort_keys=False)
        path.write_text(text + "train:\n  epochs: 1\n")  # a second train section: plain YAML keeps only it
        expected = f"train ({path}:{len(text.splitlines()) + 1}): is given twice (first at line"
    for argv in (["recipe", str(path)], [str(path), "--dry-run"]):
        _refused(launch(argv, timeout=60), 2, expected, lines=None)


def test_duplicate_key_in_a_set_value(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    out = launch(["recipe", str(path), "--set", "model.necks=[{name: SelectIndices, name: X}]"], timeout=60)
    _refused(out, 2, "--set model.necks", "found duplicate key 'name'", lines=None)


def test_convert_terratorch_non_yaml(tmp_path: Path) -> None:
    # (a key given twice is not refused here: TerraTorch reads such configs, the last value wins, and three of the
    # official Prithvi configs repeat backbone_pretrained; convert-terratorch lists them, test_convert_official_configs)
    notes = tmp_path / "notes.txt"
    notes.write_text("just a sentence\n")
    cases = [(REPO / "tests/data/real/RGB.byte.tif", "is a TIFF/GeoTIFF image, not YAML text"),
             (notes, "holds a str, not a TerraTorch config")]
    for path, expected in cases:
        _refused(launch(["convert-terratorch", str(path)], timeout=60), 3, str(path), expected)


def test_make_data_refuses_a_file_and_a_non_empty_folder(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused(launch(["make-data", str(afile), "--tiles", "1", "--img-size", "16"], timeout=60), 2, "is a file")
    out_dir = tmp_path / "tiles"
    first = launch(["make-data", str(out_dir), "--tiles", "2", "--img-size", "32"], timeout=120)
    assert first.returncode == 0, first.stderr
    again = launch(["make-data", str(out_dir), "--tiles", "1", "--img-size", "16"], timeout=60)
    _refused(again, 2, "is not empty; the new tiles would mix", "--overwrite")
    assert len(list((out_dir / "train").glob("*_img.tif"))) == 2
    (out_dir / "val" / "notes.md").write_text("mine")
    kept = launch(["make-data", str(out_dir), "--tiles", "1", "--img-size", "16", "--overwrite"], timeout=60)
    _refused(kept, 2, "also holds other files (e.g. notes.md)")
    (out_dir / "val" / "notes.md").unlink()
    replaced = launch(["make-data", str(out_dir), "--tiles", "1", "--img-size", "16", "--overwrite"], timeout=120)
    assert replaced.returncode == 0, replaced.stderr
    import rasterio

    sizes = {rasterio.open(p).width for p in (out_dir / "train").glob("*_img.tif")}
    assert sizes == {16} and len(list((out_dir / "train").glob("*_img.tif"))) == 1  # no 32 px tile left


def _without_img_size() -> dict[str, object]:
    return {k: v for k, v in RECIPE["model"].items() if k != "backbone_img_size"}  # type: ignore[attr-defined]


def _run_dir(tmp_path: Path, backbone: dict[str, object], model: dict[str, object] | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    recipe = {**RECIPE, "model": {**(model or RECIPE["model"]), **backbone}}  # type: ignore[dict-item]
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run


def test_export_refusals(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, {"backbone": "timm_resnet18"}, model=_without_img_size())
    out = launch(["export", str(run), "--official-prithvi"], timeout=120)
    _refused(out, 3, "--official-prithvi: model.backbone='timm_resnet18' is not a Prithvi-EO-2.0 backbone")
    out = launch(["export", str(run), "--checkpoint", "nothere"], timeout=120)
    _refused(out, 3, "--checkpoint nothere: not found; the run's complete checkpoints are none yet")
    assert not (run / "export").exists()


def test_recipe_with_resume_must_match_the_run(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, {})
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**RECIPE, "train": {"max_steps": 8}}))
    out = launch([str(other), "--resume", str(run), "--dry-run"], timeout=120)
    _refused(out, 3, "continues with the run's own", "differs at train.max_steps (run: 4, other.yaml: 8)",
             "--set KEY=VALUE")


@pytest.mark.slurm
def test_sbatch_rejection_leaves_no_run_directory(tmp_path: Path) -> None:
    ensure_local_slurm()
    storage = tmp_path / "runs"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data": {**RECIPE["data"], "train": {"tiles": str(tmp_path)}}}))
    out = launch([str(recipe), "--slurm", "--partition", "nosuchpartition", "--storage", str(storage)], timeout=300)
    _refused(out, 3, "sbatch refused the job", "invalid partition", "nothing was submitted", "was removed")
    assert not storage.exists() or not any(storage.iterdir()), list(storage.iterdir())


def test_recipe_check_names_a_backbone_typo_and_what_it_did_not_check(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    model = {**_without_img_size(), "backbone": "timm_resnet18", "backbone_pretrianed": True}
    path.write_text(yaml.safe_dump({**RECIPE, "model": model}))
    out = launch(["recipe", str(path)], timeout=120)
    _refused(out, 2, "model.backbone_pretrianed", "does not take 'pretrianed'", "Did you mean 'pretrained'",
             lines=None)
    ok = launch(["recipe", "recipes/quickstart.yaml"], timeout=120)
    assert ok.returncode == 0 and "backbone_* argument names" in ok.stdout, ok.stderr
    assert "only by --dry-run" in ok.stdout and "dummy batch" in ok.stdout
