"""Prithvi-EO-2.0 compatibility proof against TerraTorch (run by hand, not in CI).

TerraTorch (``terratorch==1.2.11``) lives in its own virtualenv because it pins a different dependency set::

    python3.11 -m venv /work/tt-venv
    /work/tt-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 terratorch==1.2.11
    .venv/bin/python benchmarks/compat_terratorch.py --tt-python /work/tt-venv/bin/python

What it does, for each case:

1. in the TerraTorch venv (this same file with ``--terratorch-side``): build TerraTorch's Prithvi MAE with its
   random init plus seeded noise on every tensor (so biases, LayerNorms and coordinate scales are not at their
   trivial init values), save its state dict (exactly the official checkpoint layout: ``encoder.*``,
   ``decoder.*``), load that file through TerraTorch's own backbone builder (``pretrained=True,
   ckpt_path=...``) and save the outputs of every block on a fixed seeded input;
2. here: build ours from the same file with the same arguments, run the same input and compare every block.

With ``--models``, it instead compares whole EncoderDecoderFactory models (the ``model_args`` of
``tests/unit/fixtures/terratorch_keys_*.json``: Prithvi + necks + UperNet with and without LoRA, FCN, timm +
smp Unet): TerraTorch's model with seeded noise on every tensor (BatchNorm statistics, LoRA ``B`` included) is
saved as a Lightning-shaped checkpoint, loaded here with ``read_checkpoint`` + ``load_terratorch_weights``
(strict), and both models' eval-mode logits on the same input are compared.

With ``--matrix``, it runs the compatibility matrix of ``tests/unit/test_terratorch_matrix.py`` live: the
generator ``tests/unit/fixtures/make_terratorch_outputs.py`` runs in the TerraTorch venv (every case, or
``--cases``) and writes fresh fixtures into ``<workdir>/matrix``; each is compared here exactly as the test does
(``tests/unit/_tt_matrix.py``) and a table of shapes and max abs diffs is printed and saved::

    .venv/bin/python benchmarks/compat_terratorch.py --tt-python /work/tt-venv/bin/python --matrix

It also times, in the same run, the CPU forward of ``prithvi_eo_v2_300`` on ``[1, 6, 224, 224]`` for both
(median of ``--repeats`` after one warm-up, same thread count) and the meta-device build of
``prithvi_eo_v2_600`` here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# (name, registry variant, builder kwargs, input shape, with coordinates)
CASES: list[tuple[str, str, dict[str, Any], tuple[int, ...], bool]] = [
    ("tiny", "prithvi_eo_tiny", {}, (2, 6, 224, 224), False),
    ("tiny_256x192", "prithvi_eo_tiny", {}, (2, 6, 256, 192), False),  # interpolated position embedding
    ("tiny_tl_3frames", "prithvi_eo_v2_tiny_tl", {"num_frames": 3}, (2, 6, 3, 224, 224), True),
    ("v2_300", "prithvi_eo_v2_300", {}, (1, 6, 224, 224), False),
]
TIMED = "v2_300"


def _input(shape: tuple[int, ...], coords: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    batch = {"x": torch.randn(*shape, generator=g)}
    if coords:
        b, t = shape[0], (shape[2] if len(shape) == 5 else 1)
        year = 2015 + torch.randint(0, 9, (b, t, 1), generator=g).float()
        day = torch.randint(1, 366, (b, t, 1), generator=g).float()
        batch["temporal_coords"] = torch.cat([year, day], dim=-1)
        batch["location_coords"] = torch.stack([torch.rand(b, generator=g) * 180 - 90,
                                                torch.rand(b, generator=g) * 360 - 180], dim=1)
    return batch


def _time_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> dict[str, list[float]]:
    """Wall and process-CPU seconds per forward. On a shared machine the CPU seconds are the steadier figure."""
    wall, cpu = [], []
    with torch.no_grad():
        model(**batch)  # warm-up
        for _ in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            model(**batch)
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
    return {"wall": wall, "cpu": cpu}


def terratorch_side(workdir: Path, repeats: int, threads: int) -> None:
    """Runs inside the TerraTorch venv: write checkpoints, reference outputs and timings."""
    torch.set_num_threads(threads)
    from importlib.metadata import version

    from terratorch.models.backbones.prithvi_vit import _create_prithvi
    from terratorch.registry import BACKBONE_REGISTRY

    # Importing TerraTorch's registry runs `torch.set_float32_matmul_precision("medium")` (in its clay_v15
    # module), which makes "fp32" matmuls bf16 on CPUs with AVX512-BF16 and TF32 on GPUs. Compare in real fp32.
    precision_after_import = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    report: dict[str, Any] = {"terratorch_version": version("terratorch"), "torch": torch.__version__,
                              "matmul_precision_after_terratorch_import": precision_after_import}
    for name, variant, kwargs, shape, coords in CASES:
        ckpt = workdir / f"{variant}.pt"
        if not ckpt.exists():
            torch.manual_seed(0)
            mae = _create_prithvi(variant, encoder_only=False)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for key, tensor in mae.state_dict().items():
                    if "pos_embed" not in key and tensor.is_floating_point():
                        tensor.add_(0.02 * torch.randn(tensor.shape, generator=g))
            torch.save(mae.state_dict(), ckpt)
            del mae
        model = BACKBONE_REGISTRY.build(variant, pretrained=True, ckpt_path=str(ckpt), **kwargs).eval()
        batch = _input(shape, coords)
        with torch.no_grad():
            outs = model(**batch)
        torch.save([o.contiguous() for o in outs], workdir / f"{name}.terratorch.pt")
        if name == TIMED:
            report["forward_s"] = _time_forward(model, batch, repeats)
        del model
    (workdir / "terratorch.json").write_text(json.dumps(report, indent=2))


FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "unit" / "fixtures"


def _model_cases() -> dict[str, dict[str, Any]]:
    return {p.stem.removeprefix("terratorch_keys_"): json.loads(p.read_text())
            for p in sorted(FIXTURES.glob("terratorch_keys_*.json"))}


def _model_input(model_args: dict[str, Any]) -> torch.Tensor:
    chans = 6 if str(model_args["backbone"]).startswith("prithvi") else 3
    return torch.randn(2, chans, 224, 224, generator=torch.Generator().manual_seed(99))


def terratorch_models_side(workdir: Path, threads: int) -> None:
    """Runs inside the TerraTorch venv: full models' checkpoints and eval-mode logits per fixture case."""
    import copy
    import warnings

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    from terratorch.models import EncoderDecoderFactory

    torch.set_float32_matmul_precision("highest")  # TerraTorch's import sets "medium" (see terratorch_side)
    factory = EncoderDecoderFactory()
    for name, fx in _model_cases().items():
        torch.manual_seed(0)
        model = factory.build_model(task=fx["task"], **copy.deepcopy(fx["model_args"]))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for key, tensor in model.state_dict().items():
                if "pos_embed" in key or not tensor.is_floating_point():
                    continue
                noise = 0.02 * torch.randn(tensor.shape, generator=g)
                tensor.add_(noise.abs() if "running_var" in key else noise)
        model.eval()
        with torch.no_grad():
            out = model(_model_input(fx["model_args"])).output
        sd = {f"model.{k}": v for k, v in model.state_dict().items()}
        sd["criterion.weight"] = torch.ones(1)
        torch.save({"epoch": 0, "state_dict": sd}, workdir / f"model_{name}.ckpt")
        torch.save(out, workdir / f"model_{name}.terratorch.pt")
        print(f"terratorch side: {name} logits {tuple(out.shape)}")


def compare_models(args: argparse.Namespace, workdir: Path) -> int:
    """``--models``: whole-model logits after loading TerraTorch's weights into ours (see the module doc)."""
    import copy

    subprocess.run([args.tt_python, __file__, "--terratorch-side", "--models", "--workdir", str(workdir),
                    "--threads", str(args.threads)], check=True)
    torch.set_num_threads(args.threads)
    from encdec import build_model
    from encdec.models.terratorch_ckpt import load_terratorch_weights, read_checkpoint

    rows, worst = [], 0.0
    for name, fx in _model_cases().items():
        model = build_model(fx["task"], **copy.deepcopy(fx["model_args"]))
        load_terratorch_weights(model, read_checkpoint(workdir / f"model_{name}.ckpt"), strict=True)
        model.eval()
        with torch.no_grad():
            out = model(_model_input(fx["model_args"])).output
        ref = torch.load(workdir / f"model_{name}.terratorch.pt", weights_only=True)
        if out.shape != ref.shape:
            raise SystemExit(f"{name}: logits shape {tuple(out.shape)} vs TerraTorch {tuple(ref.shape)}")
        diff = float((out - ref).abs().max())
        worst = max(worst, diff)
        rows.append({"case": name, "logits": list(out.shape), "max_abs_diff": diff,
                     "ref_abs_max": float(ref.abs().max())})
        print(f"{name:<26} logits {tuple(out.shape)!s:<18} max|diff| {diff:.3e}  (logits up to {rows[-1]['ref_abs_max']:.2f})")
    (workdir / "report_models.json").write_text(json.dumps({"torch": torch.__version__, "cases": rows,
                                                             "max_abs_diff": worst}, indent=2))
    print(f"max abs diff over all models: {worst:.3e} (fp32, eval mode); report: {workdir / 'report_models.json'}")
    return 0 if worst <= 1e-4 else 1


def compare_matrix(args: argparse.Namespace, workdir: Path) -> int:
    """``--matrix``: regenerate the matrix with the live TerraTorch and compare every case (see the module doc)."""
    tests_unit = Path(__file__).resolve().parents[1] / "tests" / "unit"
    out = workdir / "matrix"
    out.mkdir(parents=True, exist_ok=True)
    generator = [args.tt_python, str(tests_unit / "fixtures" / "make_terratorch_outputs.py"), "--out", str(out)]
    done = subprocess.run(generator + (["--only", *args.cases] if args.cases else []), check=False)
    sys.path.insert(0, str(tests_unit))
    import _tt_matrix  # tests/unit is not a package: imported once the path is set

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.cases or _tt_matrix.case_names(out):
        result = _tt_matrix.run_case(name, out)
        rows.append({"case": name, "ok": result.ok, "max_abs_diff": result.max_diff, "error": result.error,
                     "shapes": {k: [list(r), None if o is None else list(o)] for k, (r, o) in result.shapes.items()},
                     "ref_abs_max": result.ref_abs_max})
        print(("ok    " if result.ok else "FAIL  ") + result.describe())
    failed = [r["case"] for r in rows if not r["ok"]]
    (workdir / "report_matrix.json").write_text(json.dumps({"torch": torch.__version__, "atol": _tt_matrix.ATOL,
                                                             "cases": rows, "failed": failed}, indent=2))
    print(f"{len(rows) - len(failed)} of {len(rows)} cases match TerraTorch (max abs diff <= {_tt_matrix.ATOL:.0e}); "
          f"failed: {failed or 'none'}; report: {workdir / 'report_matrix.json'}")
    return 0 if not failed and done.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tt-python", default="/work/tt-venv/bin/python", help="python of the TerraTorch venv")
    parser.add_argument("--workdir", default="/tmp/compat_terratorch", help="checkpoints, outputs, report")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up")
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--models", action="store_true",
                        help="compare whole models (TerraTorch checkpoint -> load_terratorch_weights -> logits)")
    parser.add_argument("--matrix", action="store_true",
                        help="run the compatibility matrix live (generator in the TerraTorch venv, compare here)")
    parser.add_argument("--cases", nargs="*", default=None, help="with --matrix: only these cases")
    parser.add_argument("--terratorch-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.matrix:
        return compare_matrix(args, workdir)
    if args.models:
        if args.terratorch_side:
            terratorch_models_side(workdir, args.threads)
            return 0
        return compare_models(args, workdir)
    if args.terratorch_side:
        terratorch_side(workdir, args.repeats, args.threads)
        return 0

    start = time.perf_counter()
    subprocess.run(
        [args.tt_python, __file__, "--terratorch-side", "--workdir", str(workdir), "--repeats", str(args.repeats),
         "--threads", str(args.threads)],
        check=True,
    )
    tt_wall = time.perf_counter() - start
    tt = json.loads((workdir / "terratorch.json").read_text())

    torch.set_num_threads(args.threads)
    from encdec.registry import BACKBONE_REGISTRY

    torch.set_float32_matmul_precision("highest")  # the default; stated because the reference side resets it

    rows, worst = [], 0.0
    ours_forward: dict[str, list[float]] = {}
    for name, variant, kwargs, shape, coords in CASES:
        model = BACKBONE_REGISTRY.build(variant, pretrained=True, ckpt_path=str(workdir / f"{variant}.pt"), **kwargs)
        model.eval()
        batch = _input(shape, coords)
        with torch.no_grad():
            outs = model(**batch)
        ref = torch.load(workdir / f"{name}.terratorch.pt", weights_only=True)
        if len(ref) != len(outs) or any(a.shape != b.shape for a, b in zip(ref, outs)):
            raise SystemExit(f"{name}: output shapes differ: {[tuple(r.shape) for r in ref]} vs {[tuple(o.shape) for o in outs]}")
        diffs = [float((a - b).abs().max()) for a, b in zip(ref, outs)]
        worst = max(worst, *diffs)
        rows.append({"case": name, "input": list(shape), "blocks": len(outs), "max_abs_diff": max(diffs),
                     "max_abs_diff_last": diffs[-1], "ref_abs_max": float(max(r.abs().max() for r in ref))})
        if name == TIMED:
            ours_forward = _time_forward(model, batch, args.repeats)
        del model

    meta_times = []
    for _ in range(5):
        start = time.perf_counter()
        with torch.device("meta"):
            BACKBONE_REGISTRY.build("prithvi_eo_v2_600")
        meta_times.append(time.perf_counter() - start)

    report = {
        "torch": torch.__version__,
        "terratorch": tt["terratorch_version"],
        "matmul_precision_after_terratorch_import": tt["matmul_precision_after_terratorch_import"],
        "threads": args.threads,
        "cases": rows,
        "max_abs_diff": worst,
        "forward_300m_cpu_s": {
            "ours_wall_median": statistics.median(ours_forward["wall"]),
            "terratorch_wall_median": statistics.median(tt["forward_s"]["wall"]),
            "ours_cpu_median": statistics.median(ours_forward["cpu"]),
            "terratorch_cpu_median": statistics.median(tt["forward_s"]["cpu"]),
            "ours": ours_forward,
            "terratorch": tt["forward_s"],
        },
        "meta_build_600m_s": {"median": statistics.median(meta_times), "all": meta_times},
        "terratorch_side_wall_s": tt_wall,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    for r in rows:
        print(f"{r['case']:<16} input {r['input']!s:<22} {r['blocks']:>2} blocks  max|diff| {r['max_abs_diff']:.3e}"
              f"  (outputs up to {r['ref_abs_max']:.1f})")
    f = report["forward_300m_cpu_s"]
    print(f"max abs diff over all blocks and cases: {worst:.3e} (fp32; TerraTorch's import had set matmul precision "
          f"to {tt['matmul_precision_after_terratorch_import']!r}, reset to 'highest')")
    print(f"prithvi_eo_v2_300 CPU forward [1,6,224,224], {args.threads} threads, median of {args.repeats}: "
          f"ours {f['ours_wall_median']:.2f} s wall / {f['ours_cpu_median']:.2f} s CPU, TerraTorch "
          f"{f['terratorch_wall_median']:.2f} s wall / {f['terratorch_cpu_median']:.2f} s CPU")
    print(f"prithvi_eo_v2_600 meta build: {report['meta_build_600m_s']['median'] * 1e3:.1f} ms (median of 5)")
    print(f"report: {workdir / 'report.json'}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
