"""CLI bodies: make-data writes train/val tile sets a recipe can use; stats prints recipe-form statistics."""

from __future__ import annotations

import yaml

from encdec.config import DataSection
from encdec.data import build_iterator
from encdec.data.commands import make_data, stats


def test_make_data_then_stats_then_iterate(tmp_path, capsys):
    assert make_data([str(tmp_path / "d"), "--tiles", "4", "--val-tiles", "2", "--img-size", "32", "--no-cog"]) == 0
    assert len(list((tmp_path / "d" / "train").glob("*_img.tif"))) == 4
    assert len(list((tmp_path / "d" / "val").glob("*_mask.tif"))) == 2
    capsys.readouterr()
    assert stats([str(tmp_path / "d" / "train"), "--no-progress", "--out", str(tmp_path / "s.yaml")]) == 0
    result = yaml.safe_load((tmp_path / "s.yaml").read_text())
    means, stds = result["data"]["means"], result["data"]["stds"]
    assert len(means) == len(stds) == 6 and all(200 < m < 5000 for m in means) and all(s > 0 for s in stds)
    assert abs(sum(result["class_frequencies"].values()) - 1) < 1e-3 and len(result["loss"]["class_weights"]) == 2
    cfg = {"train": {"tiles": str(tmp_path / "d" / "train")}, "img_size": 32, "global_batch_size": 2,
           **result["data"]}
    batch = next(build_iterator(DataSection.model_validate(cfg)))
    valid = batch["mask"] >= 0
    # Normalised with its own statistics, the valid pixels are centred near 0 with unit-ish spread.
    assert abs(batch["image"].permute(1, 0, 2, 3)[:, valid].mean().item()) < 0.6


def test_stats_by_index_and_errors(tmp_path, capsys):
    make_data([str(tmp_path / "d"), "--tiles", "2", "--img-size", "32", "--no-cog"])
    capsys.readouterr()
    assert stats([str(tmp_path / "d" / "train"), "--bands", "3,RED", "--no-progress"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["bands"] == [3, "RED"]
    assert stats([str(tmp_path / "nothing")]) == 2
    assert "matches no files" in capsys.readouterr().err
    assert make_data([str(tmp_path / "e"), "--tiles", "1", "--img-size", "8"]) == 2
