"""The DeepSpeed private-state patches run only inside the tested version range; outside it they step aside with a
warning (memory fixes) or a clear error (the universal-checkpoint switch a resize needs), never a crash."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from encdec.distributed import deepspeed_patches as P
from encdec.distributed.ckpt_io import CheckpointError


def test_the_tested_range_matches_the_pin_and_the_installed_version() -> None:
    import re
    from pathlib import Path

    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    (low, high), = re.findall(r'"deepspeed>=([\d.]+),<([\d.]+)"', pyproject)
    (a, b), (c, d) = P.TESTED_DEEPSPEED
    assert (low, high) == (f"{a}.{b}", f"{c}.{d}"), "pyproject.toml pins another range than the patches test"
    installed = P.deepspeed_version()
    if installed is not None:
        assert P.patch_enabled("probe", "none", installed), f"installed DeepSpeed {installed} is outside the range"


@pytest.mark.parametrize(("version", "ok"), [("0.19.0", True), ("0.19.8", True), ("0.19.8+cu12", True),
                                             ("0.18.9", False), ("0.20.0", False), ("1.0", False), ("dev", False),
                                             (None, False)])
def test_version_gate(version: str | None, ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if version is None:
        monkeypatch.setattr(P, "deepspeed_version", lambda: None)
    if ok:
        assert P.patch_enabled("gate", "nothing", version)
    else:
        with pytest.warns(P.DeepSpeedPatchWarning, match="outside the range"):
            assert not P.patch_enabled(f"gate-{version}", "nothing", version)


def _fake_zero3() -> SimpleNamespace:
    part = torch.zeros(8)
    return SimpleNamespace(fp32_partitioned_groups_flat=[torch.ones(8)], fp16_partitioned_groups_flat=[part],
                           grad_partitions_flat_buffer=torch.ones(1 << 16), optimizer=SimpleNamespace(state={}))


def test_memory_patches_step_aside_outside_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    zero = _fake_zero3()
    monkeypatch.setattr(P, "deepspeed_version", lambda: "0.23.1")
    with pytest.warns(P.DeepSpeedPatchWarning, match="share_stage3_fp32_master"):
        assert P.share_stage3_fp32_master(zero) == 0
    with pytest.warns(P.DeepSpeedPatchWarning, match="release_grad_pages"):
        assert P.release_grad_pages(zero) == 0
    assert zero.fp32_partitioned_groups_flat[0].data_ptr() != zero.fp16_partitioned_groups_flat[0].data_ptr()
    assert bool((zero.grad_partitions_flat_buffer == 1).all()), "an untested DeepSpeed's buffers are not touched"

    monkeypatch.setattr(P, "deepspeed_version", lambda: "0.19.8")  # inside: the same objects are patched
    assert P.share_stage3_fp32_master(zero) == 8 * 4
    assert zero.fp32_partitioned_groups_flat[0].data_ptr() == zero.fp16_partitioned_groups_flat[0].data_ptr()
    P.release_grad_pages(zero)
    assert bool((zero.grad_partitions_flat_buffer == 0).all())


def test_universal_checkpoint_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
    monkeypatch.setattr(P, "deepspeed_version", lambda: "0.19.8")
    with P.universal_checkpoint_loading(engine, True):
        assert engine._config.load_universal_checkpoint is True
    assert engine._config.load_universal_checkpoint is False

    monkeypatch.setattr(P, "deepspeed_version", lambda: "0.21.0")
    with P.universal_checkpoint_loading(engine, False):  # same world size: no private state needed
        pass
    with pytest.raises(CheckpointError, match="world size and zero_stage that wrote the checkpoint"):
        with P.universal_checkpoint_loading(engine, True):
            pass
    assert engine._config.load_universal_checkpoint is False


def test_version_without_package_metadata_falls_back_to_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DeepSpeed copied without its dist-info keeps its patches: the module's own ``__version__`` is judged."""
    from importlib import metadata

    deepspeed = pytest.importorskip("deepspeed")

    def no_metadata(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", no_metadata)
    assert P.deepspeed_version() == deepspeed.__version__
    assert P.patch_enabled("probe-no-metadata", "none")
