"""The TerraTorch compatibility matrix: for each case, TerraTorch 1.2.11's outputs (``fixtures/terratorch_matrix``,
written by ``fixtures/make_terratorch_outputs.py`` in a TerraTorch virtualenv) equal ours to 1e-5, relative to the
largest output above magnitude 1 (fp32, matmul precision "highest", eval mode) with the same shapes, for the same model_args, input and weights.

The weights are not stored: both sides fill every state-dict entry with ``fill(name, shape, dtype)`` (one tiny
function, kept identical in the generator and in ``_tt_matrix.py``), in TerraTorch's key layout; ours load them
through ``load_terratorch_weights``, the key mapping ``--init-from`` uses. The failure message names the case, the
output, the shapes and the max abs diff.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from _tt_matrix import ATOL, GENERATOR, MATRIX_DIR, case_names, run_case

from encdec.registry import NECK_REGISTRY

CASES = case_names()
REQUIRED_DECODERS = {"FCNDecoder", "UperNetDecoder", "UNetDecoder", "IdentityDecoder", "LinearDecoder"}
TASKS = {"segmentation", "regression", "classification", "scalar_regression"}


def _generator() -> ModuleType:
    """The generator's module (it imports torch only; TerraTorch is imported inside its functions)."""
    spec = importlib.util.spec_from_file_location("make_terratorch_outputs", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _metas() -> dict[str, dict]:
    from safetensors import safe_open

    out = {}
    for name in CASES:
        with safe_open(str(MATRIX_DIR / f"{name}.safetensors"), framework="pt") as f:
            out[name] = json.loads(f.metadata()["fixture"])
    return out


@pytest.mark.parametrize("case", CASES)
def test_terratorch_output_matches(case: str) -> None:
    result = run_case(case)
    if not result.ok:
        pytest.fail(result.describe(), pytrace=False)


def test_every_generator_case_has_its_fixture_with_versions() -> None:
    assert set(CASES) == set(_generator().CASES), "rerun fixtures/make_terratorch_outputs.py in the TerraTorch venv"
    for name, meta in _metas().items():
        assert meta["terratorch"] == "1.2.11", name
        assert meta["torch"] and meta["segmentation_models_pytorch"] and meta["timm"], name
        assert meta["matmul_precision"] == "highest", name


def test_the_two_fill_functions_are_identical() -> None:
    def source(path: Path) -> str:
        tree = ast.parse(path.read_text())
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fill")
        return ast.unparse(node)

    assert source(GENERATOR) == source(Path(__file__).parent / "_tt_matrix.py")


def test_matrix_covers_the_promised_configurations() -> None:
    metas = _metas()
    args = [m["model_args"] for m in metas.values()]
    necks = {n["name"] for a in args for n in a.get("necks", [])}
    assert set(NECK_REGISTRY) <= necks, f"necks without a case: {set(NECK_REGISTRY) - necks}"
    decoders = {a["decoder"] for a in args} | {d["decoder"] for a in args for d in a.get("aux_decoders", [])}
    assert decoders >= REQUIRED_DECODERS and any(d.startswith("smp_") for d in decoders)
    assert {m["task"] for m in metas.values()} == TASKS
    assert any("aux_decoders" in a for a in args) and any(a.get("rescale") is False for a in args)
    assert any("necks" not in a for a in args if str(a["backbone"]).startswith("prithvi"))
    for key in ("head_channel_list", "head_dropout", "head_learned_upscale_layers", "head_final_act"):
        assert any(key in a for a in args), key
    assert all(m["keys"] for m in metas.values())  # TerraTorch's layout, recorded per case


def test_fixtures_stay_small() -> None:
    total = sum(p.stat().st_size for p in MATRIX_DIR.glob("*.safetensors"))
    assert total <= 10e6, f"the matrix fixtures take {total / 1e6:.1f} MB (limit 10 MB)"


def test_inputs_cover_the_promised_shapes() -> None:
    from _tt_matrix import load_fixture

    shapes = {name: tuple(load_fixture(name).inputs["x"].shape) for name in CASES}
    assert any(s[-1] == s[-2] for s in shapes.values()) and any(s[-1] != s[-2] for s in shapes.values())
    assert any(s[-1] % 16 or s[-2] % 16 for s in shapes.values())  # not a multiple of the patch size
    five_d = [n for n, s in shapes.items() if len(s) == 5]
    assert any({"temporal_coords", "location_coords"} <= set(load_fixture(n).inputs) for n in five_d)
    assert ATOL == 1e-5  # the bound the matrix promises (fp32)
