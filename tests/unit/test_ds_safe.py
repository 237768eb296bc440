"""DeepSpeed checkpoints are checked by the restricted unpickler before DeepSpeed's own loader reads them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from encdec.distributed.ds_safe import check_deepspeed_checkpoint
from encdec.models.safe_load import UnsafeGlobalError


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _optim_states(tmp: Path) -> dict[str, object]:
    """What a ZeRO-2 ``zero_pp_rank_0_mp_rank_00_optim_states.pt`` holds (its DeepSpeed classes included)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                                     "single_partition_of_fp32_groups": [torch.ones(4)]},
            "ds_config": {"train_batch_size": 8}, "ds_version": "0.18.0"}


def test_deepspeed_data_classes_pass_and_a_crafted_file_is_refused_without_running(tmp_path: Path) -> None:
    tag = tmp_path / "state" / "ds"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save(_optim_states(tmp_path), tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert check_deepspeed_checkpoint(tag) == 2

    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.zeros(2)}, "client_state": _Payload(marker)},
               tag / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    with pytest.raises(UnsafeGlobalError, match=r"zero_pp_rank_1_mp_rank_00_model_states\.pt names \['posix\.system'\]"):
        check_deepspeed_checkpoint(tag)
    assert not marker.exists()
