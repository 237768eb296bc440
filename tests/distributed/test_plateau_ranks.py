"""The plateau schedule in the real loop on 2 gloo ranks: the LR drops on both ranks at the same step, and a run
stopped and resumed continues its plateau state (best value, reductions) as if never interrupted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _spawn import run_distributed
from test_early_stop_ranks import _run, _train

pytestmark = pytest.mark.distributed

LR = 1e-3
# no later validation beats the first by 100: with patience 0 each validation after the first (steps 4, 6) lowers
# the LR by half, whatever the losses do; the LR of step s is used from step s + 1 on
PLATEAU = {"metric": "val/loss", "mode": "min", "factor": 0.5, "patience": 0, "threshold": 100.0,
           "threshold_mode": "abs"}
EXPECTED = {1: LR, 2: LR, 3: LR, 4: LR, 5: LR / 2, 6: LR / 2}  # step -> the LR it trained at


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from encdec.data.synthetic import write_tiles

    root = tmp_path_factory.mktemp("tiles")
    return {"train": str(write_tiles(root / "train", 16, img_size=32, seed=0)),
            "val": str(write_tiles(root / "val", 4, img_size=32, seed=1))}


def _plateau_run(tiles: dict[str, str], run_dir: Path, **extra: Any) -> dict[str, Any]:
    run = _run(tiles, run_dir, "ddp", **extra)
    run["optim"] = {"name": "adamw", "lr": LR, "grad_clip": 1.0, "schedule": "plateau", "plateau": PLATEAU}
    run["train"] = {**run["train"], "max_steps": 6, "log_every": 1, "early_stop": None}
    return run


def _lrs(reports: list[dict[str, Any]]) -> dict[int, float]:
    return {m["step"]: m["train/lr"] for m in reports if "train/lr" in m}


def _plateau_state(ckpt: str) -> list[dict[str, Any]]:
    from encdec.distributed.ckpt_io import load_extra

    return [load_extra(ckpt, rank, 2)["plateau"] for rank in range(2)]


def test_lr_drops_on_every_rank_at_the_same_step_and_survives_resume(tiles: dict[str, str], tmp_path: Path) -> None:
    first = _plateau_run(tiles, tmp_path / "run", stop_after=4)  # stops after step 4, whose validation lowered the LR
    again = _plateau_run(tiles, tmp_path / "run", resume=str(tmp_path / "run"))
    per_rank = run_distributed(_train, 2, [first, again], timeout_s=600)
    for stopped, resumed in per_rank:
        assert stopped["final"]["stopped"] and stopped["final"]["step"] == 4
        # both ranks: steps 1-4 at the peak, then (from the checkpoint's reduction) steps 5-6 at half of it
        assert {**_lrs(stopped["reports"]), **_lrs(resumed["reports"])} == pytest.approx(EXPECTED)
    at_stop = _plateau_state(per_rank[0][0]["final"]["checkpoint"])
    at_end = _plateau_state(per_rank[0][1]["final"]["checkpoint"])
    assert at_stop[0] == at_stop[1] and at_stop[0]["reductions"] == 1 and at_stop[0]["best"] is not None
    # the best value came back too: step 6 was not taken for a first validation (which always improves), so it
    # lowered the LR a second time, identically on both ranks
    assert at_end[0] == at_end[1] and at_end[0]["reductions"] == 2 and at_end[0]["best"] == at_stop[0]["best"]
