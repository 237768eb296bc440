"""Our side of the TerraTorch compatibility matrix (``fixtures/terratorch_matrix/*.safetensors``).

Each fixture holds a case's inputs and TerraTorch 1.2.11's outputs, plus the model_args and TerraTorch's state-dict
layout (written by ``fixtures/make_terratorch_outputs.py`` in TerraTorch's own virtualenv). Here the model is built
from the same model_args with our factory, the weights come from ``fill`` (the generator's function, copied
below) under TerraTorch's key names and are loaded through ``load_terratorch_weights`` (what ``--init-from``
uses), and the outputs are compared. Used by ``test_terratorch_matrix.py`` and ``benchmarks/compat_terratorch.py``.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).parent / "fixtures"
MATRIX_DIR = FIXTURES / "terratorch_matrix"
GENERATOR = FIXTURES / "make_terratorch_outputs.py"
ATOL = 1e-5  # absolute for outputs up to 1 in magnitude, relative to TerraTorch's largest output above that


def allowed_diff(ref_abs_max: float) -> float:
    """fp32 round-off grows with the values: the same model on another CPU (AVX2 vs AVX-512 kernels sum in another
    order) differs by a few ulps of its largest output, so the bound scales with it above 1."""
    return ATOL * max(1.0, ref_abs_max)


# The same function, character for character, is in fixtures/make_terratorch_outputs.py (TerraTorch's side of the
# matrix); the test checks that the two copies are equal. Keep it tiny, pure and dependent on torch only.
def fill(name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
    """The value of state-dict entry ``name`` in the matrix (None: keep the model's own value)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "pos_embed" or not dtype.is_floating_point:  # fixed sin-cos tables; integer counters
        return None
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if leaf == "running_var":
        return 0.5 + torch.rand(tuple(shape), generator=gen)
    if len(shape) >= 2:  # weights: unit-variance outputs for unit-variance inputs
        return torch.randn(tuple(shape), generator=gen) / math.sqrt(math.prod(shape[1:]))
    if leaf in ("bias", "running_mean"):
        return 0.1 * torch.randn(tuple(shape), generator=gen)
    return 1.0 + 0.1 * torch.randn(tuple(shape), generator=gen)  # norm weights, coordinate scales


@dataclass
class Fixture:
    name: str
    meta: dict[str, Any]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]  # "output" and "aux.<name>"


@dataclass
class CaseResult:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = field(default_factory=dict)  # ref, ours
    diffs: dict[str, float] = field(default_factory=dict)
    ref_abs_max: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and all(ref == ours for ref, ours in self.shapes.values())
                and all(d <= allowed_diff(self.ref_abs_max) for d in self.diffs.values()))

    @property
    def max_diff(self) -> float:
        return max(self.diffs.values(), default=math.inf)

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.name}: {self.error}"
        bad = [f"{k}: TerraTorch {ref} vs ours {ours}" for k, (ref, ours) in self.shapes.items() if ref != ours]
        diffs = ", ".join(f"{k} {d:.2e}" for k, d in self.diffs.items())
        return (f"{self.name}: " + ("; ".join(bad) + "; " if bad else "")
                + f"max abs diff {diffs} (TerraTorch's outputs up to {self.ref_abs_max:.2f}; allowed {allowed_diff(self.ref_abs_max):.1e})")


def case_names(directory: Path = MATRIX_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.safetensors"))


def load_fixture(name: str, directory: Path = MATRIX_DIR) -> Fixture:
    from safetensors import safe_open

    with safe_open(str(directory / f"{name}.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["fixture"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
    outputs = {k: v for k, v in tensors.items() if not k.startswith("input.")}
    return Fixture(name, meta, inputs, outputs)


def terratorch_state_dict(meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights TerraTorch's model had, under TerraTorch's names: ``fill`` for every entry it filled, zeros for
    integer counters; fixed tables it kept (Prithvi's sin-cos ``pos_embed``) are left out, as our model
    recomputes them."""
    out = {}
    for key, (shape, dtype_name, filled) in meta["keys"].items():
        dtype = getattr(torch, dtype_name)
        value = fill(key, shape, dtype)
        if value is not None:
            out[key] = value.to(dtype)
        elif not filled and not dtype.is_floating_point:
            out[key] = torch.zeros(shape, dtype=dtype)
    return out


def build_ours(meta: dict[str, Any]) -> torch.nn.Module:
    from encdec import build_model
    from encdec.models import AuxiliaryHead

    args = copy.deepcopy(meta["model_args"])
    if "aux_decoders" in args:
        args["aux_decoders"] = [AuxiliaryHead(a["name"], a["decoder"], a.get("decoder_args")) for a in
                                args["aux_decoders"]]
    return build_model(meta["task"], **args)


def run_case(name: str, directory: Path = MATRIX_DIR) -> CaseResult:
    """Build, load, run and compare one case; problems are recorded in the result, not raised."""
    from encdec.models.terratorch_ckpt import load_terratorch_weights

    fx = load_fixture(name, directory)
    result = CaseResult(name, ref_abs_max=max(float(v.abs().max()) for v in fx.outputs.values()))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        model = build_ours(fx.meta)
        load_terratorch_weights(model, terratorch_state_dict(fx.meta), strict=True)
        model.eval()
        with torch.no_grad():
            out = model(**fx.inputs)
    except Exception as err:  # a case we cannot build, load or run is a failed case with its reason
        result.error = f"{type(err).__name__}: {err}"
        return result
    finally:
        torch.set_float32_matmul_precision(precision)
    ours = {"output": out.output, **{f"aux.{k}": v for k, v in (out.auxiliary_heads or {}).items()}}
    for key, ref in fx.outputs.items():
        got = ours.get(key)
        result.shapes[key] = (tuple(ref.shape), None if got is None else tuple(got.shape))
        if got is not None and got.shape == ref.shape:
            result.diffs[key] = float((got.float() - ref).abs().max())
    for key in ours.keys() - fx.outputs.keys():
        result.shapes[key] = ((), tuple(ours[key].shape))  # an output TerraTorch does not have
    return result
