"""``train.early_stop`` in the real loop on 2 gloo ranks: a stalled metric ends the run at the same step on both
ranks with a checkpoint and status ``early-stopped``; the patience count survives a stop and resume."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from _spawn import run_distributed
from test_loop_parity import typed

pytestmark = pytest.mark.distributed

BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
MODEL = {"backbone": "timm_test_convnext", "backbone_in_chans": 6, "decoder": "smp_Unet",
         "decoder_decoder_channels": [16, 16, 8], "decoder_decoder_use_norm": "identity", "head_norm": "group",
         "num_classes": 2}
# lr 1e-9: val/loss moves by far less than min_delta, so validations 2 and 3 (steps 4, 6) do not improve on the
# first (step 2) and patience 2 stops the run at step 6 of 20
EARLY = {"metric": "val/loss", "mode": "min", "patience": 2, "min_delta": 0.01}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from encdec.data.synthetic import write_tiles

    root = tmp_path_factory.mktemp("tiles")
    return {"train": str(write_tiles(root / "train", 16, img_size=32, seed=0)),
            "val": str(write_tiles(root / "val", 4, img_size=32, seed=1))}


def _run(tiles: dict[str, str], run_dir: Path, strategy: str, **extra: Any) -> dict[str, Any]:
    return {
        "task": "segmentation", "model": MODEL, "loss": {"name": "ce", "ignore_index": -1},
        "data": {"train": {"tiles": tiles["train"]}, "val": {"tiles": tiles["val"]}, "img_size": 32,
                 "global_batch_size": 4, "bands": BANDS, "reader": {"threads": 1, "prefetch_batches": 1}},
        "optim": {"name": "adamw", "lr": 1e-9, "grad_clip": 1.0},
        "train": {"max_steps": 20, "precision": "fp32", "strategy": strategy, "log_every": 2, "val_every": 2,
                  "ckpt_every": 100, "early_stop": EARLY},
        "seed": 0, "run_dir": str(run_dir), **extra,
    }


def _train(rank: int, world: int, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from encdec.train.loop import train

    out = []
    for run in runs:
        run = dict(run)
        limit = run.pop("stop_after", None)
        counter = itertools.count()
        reports: list[dict[str, Any]] = []
        final = train(**typed(run), report=lambda m, c, r=reports: r.append(m),
                      stop_requested=lambda c=counter, n=limit: n is not None and next(c) >= n)
        out.append({"final": final, "reports": reports})
    return out


@pytest.fixture(scope="module")
def runs(tiles: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every run of this module in ONE 2-process spawn (process start-up dominates on 2 cores), one after the
    other, each in its own run directory: a stall under DDP and under FSDP2, and a DDP run stopped after step 4
    then resumed. Returns ``{name: (run_dir, [rank 0's result, rank 1's result])}``."""
    root = tmp_path_factory.mktemp("early_stop")
    plan = {
        "ddp": _run(tiles, root / "ddp", "ddp"),
        "fsdp": _run(tiles, root / "fsdp", "fsdp"),
        "stopped": _run(tiles, root / "resume", "ddp", stop_after=4),  # one validation without improvement
        "resumed": _run(tiles, root / "resume", "ddp", resume=str(root / "resume")),
    }
    per_rank = run_distributed(_train, 2, list(plan.values()), timeout_s=900)
    return {name: (Path(run["run_dir"]), [r[i] for r in per_rank]) for i, (name, run) in enumerate(plan.items())}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_stalled_metric_stops_every_rank_at_the_same_step(strategy: str, runs: dict[str, Any]) -> None:
    run_dir, per_rank = runs[strategy]
    finals = [r["final"] for r in per_rank]
    for final in finals:
        assert final["step"] == 6 and final["status"] == "early-stopped" and not final["stopped"]
        assert Path(final["checkpoint"]).name == "step_00000006"  # it checkpointed where it stopped
    assert (run_dir / "checkpoints" / "step_00000006").is_dir()
    val_steps = [m["step"] for m in per_rank[0]["reports"] if "val/loss" in m]
    assert sorted(set(val_steps)) == [2, 4, 6]
    last_line = (run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"status": "early-stopped"' in last_line


def test_patience_count_survives_stop_and_resume(runs: dict[str, Any]) -> None:
    stopped, resumed = runs["stopped"][1][0], runs["resumed"][1][0]
    assert stopped["final"]["stopped"] and stopped["final"]["step"] == 4
    # the count (1 of 2) came back from the checkpoint: the next validation (step 6) stops the run, as it would
    # have without the interruption; a fresh count would have run on to step 8
    assert resumed["final"]["step"] == 6 and resumed["final"]["status"] == "early-stopped"
