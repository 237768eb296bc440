"""``train(init_from=...)``: a run starts from another model's weights (a TerraTorch-style Lightning checkpoint).

A tiny model is trained for 3 steps; its DCP checkpoint is turned into a Lightning-shaped file (weights under
``state_dict`` with the task's ``model.`` prefix, as TerraTorch writes them). A new run with ``init_from`` that
file must report, as its step-1 loss (computed before the first update), exactly the loss of the trained model on
the run's first global batch, computed here independently. Checked in one process (strategy ``none``) and at 2
processes with FSDP2 (rank 0 loads the file; the other rank builds on the meta device and gets the weights by
broadcast). A resumed run ignores ``init_from`` (the checkpoint wins): given a file that does not exist, it
still runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _spawn import run_distributed
from test_loop_parity import MODELS, _sections, _train, typed

pytestmark = pytest.mark.distributed

MODEL = "timm_smp_unet"


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from encdec.data.synthetic import write_tiles

    root = tmp_path_factory.mktemp("tiles")
    return {"train": str(write_tiles(root / "train", 8, img_size=32, seed=0))}


def _lightning_file(dcp_state: Path, out: Path) -> dict[str, torch.Tensor]:
    """Our DCP checkpoint -> a file shaped like a TerraTorch (Lightning) checkpoint; returns the plain weights."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    plain = out.with_suffix(".pt")
    dcp_to_torch_save(str(dcp_state), str(plain))
    weights = torch.load(plain, weights_only=True)["model"]
    torch.save({"epoch": 0, "global_step": 3, "state_dict": {f"model.{k}": v for k, v in weights.items()},
                "optimizer_states": []}, out)
    return weights


def _first_batch_loss(sections: dict[str, Any], weights: dict[str, torch.Tensor]) -> float:
    """The loss of a model holding ``weights`` on the first global batch of the run ``sections`` describes."""
    from encdec.data import build_iterator
    from encdec.models import build_model
    from encdec.train.losses import build_loss

    net = build_model(sections["task"], **sections["model"])
    net.load_state_dict(weights, strict=True)
    net.train()  # the loop's step-1 loss comes from a training-mode forward (no dropout or batch norms here)
    typed_sections = typed(sections)
    it = build_iterator(typed_sections["data"], split="train", seed=sections["seed"])
    try:
        batch = next(iter(it))
    finally:
        it.close()
    with torch.no_grad():
        out = net(batch["image"])
    return float(build_loss(sections["task"], typed_sections["loss"])(out, batch))


def test_init_from_loads_the_weights_single_and_fsdp(tiles: dict[str, str], tmp_path: Path) -> None:
    assert MODEL in MODELS
    base = _sections(tiles, model=MODEL, ckpt_every=3, max_steps=3, log_every=1)
    run_distributed(_train, 1, [{**base, "run_dir": str(tmp_path / "source")}], timeout_s=300)
    ckpt = tmp_path / "source" / "checkpoints" / "step_00000003"
    init = tmp_path / "epoch=0-step=3.ckpt"
    weights = _lightning_file(ckpt / "state", init)
    one_step = _sections(tiles, model=MODEL, max_steps=1, log_every=1)
    want = _first_batch_loss(one_step, weights)

    runs = [
        {**one_step, "run_dir": str(tmp_path / "init"), "init_from": str(init)},
        {**one_step, "run_dir": str(tmp_path / "fresh")},
        # resuming: the checkpoint wins, init_from is not even opened
        {**_sections(tiles, model=MODEL, max_steps=4, log_every=1), "run_dir": str(tmp_path / "resumed"),
         "resume": str(ckpt), "init_from": str(tmp_path / "absent.ckpt")},
    ]
    init_run, fresh, resumed = run_distributed(_train, 1, runs, timeout_s=300)[0]
    assert init_run["losses"][0] == pytest.approx(want, rel=1e-5)
    assert abs(fresh["losses"][0] - want) > 1e-3 * want, "the fresh model already had the trained loss"
    assert resumed["first_step"] == 4

    fsdp = {**_sections(tiles, model=MODEL, strategy="fsdp", max_steps=1, log_every=1),
            "run_dir": str(tmp_path / "fsdp"), "init_from": str(init)}
    per_rank = run_distributed(_train, 2, [fsdp], timeout_s=300)
    assert per_rank[0][0]["losses"][0] == pytest.approx(want, rel=1e-5)


def test_adapter_only_resume_takes_frozen_weights_from_init_from_again(tiles: dict[str, str], tmp_path: Path) -> None:
    """A LoRA run's checkpoints hold only trainable tensors; resuming it with the same init_from rebuilds the
    frozen base from that file (not from the pretrained/seeded weights), so steps 3-4 equal the uninterrupted run."""
    from encdec.models import build_model

    model = "prithvi_lora_upernet"
    torch.manual_seed(7)  # base weights unlike the run's own seeded init
    source = build_model("segmentation", **MODELS[model]).state_dict()
    init = tmp_path / "lora.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.items()}}, init)
    sec = _sections(tiles, model=model, max_steps=4, log_every=1)
    run_dir = str(tmp_path / "run")
    runs = [
        {**sec, "run_dir": str(tmp_path / "whole"), "init_from": str(init)},
        {**sec, "run_dir": run_dir, "init_from": str(init), "stop_after": 2},
        {**sec, "run_dir": run_dir, "init_from": str(init), "resume": run_dir},
    ]
    whole, first, resumed = run_distributed(_train, 1, runs, timeout_s=300)[0]
    assert first["final"]["stopped"] and resumed["first_step"] == 3
    assert resumed["losses"] == pytest.approx(whole["losses"][2:], rel=1e-5)
