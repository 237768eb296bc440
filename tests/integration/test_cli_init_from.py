"""``--init-from``: TerraTorch (Lightning) checkpoints are read without TerraTorch installed; bad input fails early."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from launcher_testlib import launch, quick_args


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


def test_terratorch_checkpoint_reads_without_terratorch(tmp_path: Path) -> None:
    ckpt = _write_lightning_ckpt(tmp_path)
    # a fresh interpreter that cannot import the pickled class's module
    code = ("from encdec.launcher.convert_terratorch import terratorch_state_dict\n"
            f"sd = terratorch_state_dict({str(ckpt)!r})\nprint(sorted(sd), tuple(sd['head.head.weight'].shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "['encoder.patch_embed.proj.weight', 'head.head.weight'] (2, 8)" in out.stdout


def test_init_from_missing_file_fails_before_any_cluster(quick_tiles: Path, tmp_path: Path) -> None:
    out = launch(quick_args(quick_tiles, tmp_path, "--init-from", str(tmp_path / "nope.ckpt")), timeout=300)
    assert out.returncode == 3
    assert "--init-from" in out.stderr and "nope.ckpt" in out.stderr and "no such file" in out.stderr
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("quickstart-*"))
