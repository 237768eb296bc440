"""Package-level promises: the public API names, a light `import encdec`, and a torch-free `--help`."""

from __future__ import annotations

import subprocess
import sys

import encdec


def test_public_api_names() -> None:
    for name in (
        "EncoderDecoderFactory", "BACKBONE_REGISTRY", "DECODER_REGISTRY", "NECK_REGISTRY", "NECKS_REGISTRY",
        "Registry", "MultiSourceRegistry", "AuxiliaryHead", "ModelOutput", "PixelWiseModel", "ScalarOutputModel",
    ):
        assert getattr(encdec, name) is not None
    assert encdec.NECKS_REGISTRY is encdec.NECK_REGISTRY


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from encdec.launcher.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    assert _run(code).splitlines()[-1] == "NO-TORCH"


def test_version_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "encdec.launcher.cli", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"encdec-launch {encdec.__version__}"


def test_building_imports_no_heavy_libraries() -> None:
    code = (
        "import sys, encdec\n"
        "encdec.build_model\n"
        "print(sorted(m for m in ('ray', 'deepspeed', 'segmentation_models_pytorch', 'rasterio', 'peft') "
        "if m in sys.modules))"
    )
    assert _run(code) == "[]"
