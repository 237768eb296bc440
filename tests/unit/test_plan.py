"""The planner: meta-device build of every shipped recipe, parameter counts, memory formulas, clear errors."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from encdec.launcher.preflight.plan import GiB, build_meta_model, estimate_memory, make_plan
from encdec.launcher.recipe.errors import RecipeError
from encdec.launcher.recipe.validate import load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_plans(path: Path) -> None:
    recipe = load_recipe(path)
    plan = make_plan(recipe)
    assert plan.total_params > 0 and 0 < plan.trainable_params <= plan.total_params
    assert plan.output_shape[0] == plan.micro_batch
    assert plan.chosen in {e.strategy for e in plan.estimates}
    for e in plan.estimates:
        assert e.activations_ckpt <= e.activations and e.total > e.runtime


def test_no_weights_allocated() -> None:
    recipe = load_recipe(REPO / "recipes" / "prithvi_lora.yaml")
    model = build_meta_model(recipe)
    assert all(p.is_meta for p in model.parameters())


def test_prithvi_300_lora_counts() -> None:
    recipe = load_recipe(REPO / "recipes" / "prithvi_lora.yaml", flags={"cluster.nodes": 8})
    make_plan(load_recipe(REPO / "recipes" / "quickstart.yaml"))  # imports and registries warm, as in one CLI call
    start = time.perf_counter()
    plan = make_plan(recipe)
    seconds = time.perf_counter() - start
    parts = plan.parts
    # 24 blocks x (q, v) x (A: r x 1024 + B: 1024 x r), r = 16 (REFERENCE.md)
    assert parts["adapters"].trainable == 24 * 2 * 2 * 1024 * 16
    assert parts["backbone-base"].trainable == 0 and parts["backbone-base"].total > 300e6
    assert plan.world_size == 64 and plan.micro_batch == 8
    assert plan.input_shape == (8, 6, 224, 224) and plan.output_shape == (8, 2, 224, 224)
    assert plan.fits("fsdp") is True  # 80 GB per GPU in the recipe
    # speed is measured, not asserted (a loaded CI machine is no timer): README's plan-time figure comes from here
    print(f"planning the 300M recipe took {seconds:.1f} s")


def test_sharding_shrinks_memory_for_full_finetune() -> None:
    recipe = load_recipe(REPO / "recipes" / "prithvi_600_zero3.yaml")
    plan = make_plan(recipe)
    ddp, fsdp, z3 = plan.estimate("ddp"), plan.estimate("fsdp"), plan.estimate("zero3")
    assert fsdp.params < ddp.params / 8 and z3.optim < ddp.optim / 32
    assert plan.estimate("zero2").params > z3.params  # ZeRO-2 does not shard the weights
    assert plan.chosen == "zero3" and plan.activation_checkpointing


def test_memory_formulas() -> None:
    kw = {"unit_params": 10, "unit_trainable": 10, "act": 1000, "act_ckpt": 100, "compute_bytes": 4,
          "frozen_bytes": 4, "optim_bytes": 8, "runtime": 0}
    est = {e.strategy: e for e in estimate_memory(total=1000, trainable=1000, world=4, **kw)}
    assert est["none"].params == 4000 and est["none"].grads == 4000 and est["none"].optim == 8000
    assert est["fsdp"].params == 1000 + 80 and est["fsdp"].optim == 2000
    assert est["zero3"].grads == 1000 and est["zero3"].params == 1000 + 80
    lora = {e.strategy: e for e in estimate_memory(total=1000, trainable=10, world=4, **kw)}
    assert lora["ddp"].optim == 80 and lora["ddp"].params == 4000


def test_fit_flags_and_recommendation() -> None:
    recipe = load_recipe(REPO / "recipes" / "prithvi_600_zero3.yaml",
                         flags={"cluster.device_memory_gb": 4, "cluster.nodes": 1})
    plan = make_plan(recipe)
    assert plan.fits("ddp") is False
    assert plan.recommended is not None and ("deepspeed" in plan.recommended or "fsdp" in plan.recommended)
    tiny = load_recipe(REPO / "recipes" / "prithvi_600_zero3.yaml", flags={"cluster.device_memory_gb": 0.5})
    plan = make_plan(tiny)
    assert plan.recommended is None and any("needs" in w for w in plan.warnings)
    assert plan.device_memory == int(0.5 * GiB)


def test_unknown_names_are_reported_together(tmp_path: Path) -> None:
    text = (REPO / "recipes" / "quickstart.yaml").read_text()
    text = text.replace("decoder: UperNetDecoder", "decoder: UperNetDecodr").replace(
        "{name: ReshapeTokensToImage}", "{name: ReshapeTokensToImg}")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        make_plan(load_recipe(path))
    text = str(info.value)
    assert "model.decoder (" in text and "bad.yaml:" in text and "Did you mean 'UperNetDecoder'" in text
    assert "model.necks[1].name" in text and "ReshapeTokensToImage" in text


def test_shape_mismatch_is_a_recipe_error() -> None:
    # 3 bands in the data, but the backbone left at its 6 default bands: the dummy batch cannot go through
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "data.bands=[BLUE, GREEN, RED]", "data.means=[1, 1, 1]", "data.stds=[1, 1, 1]", "model.backbone_bands=null"])
    with pytest.raises(RecipeError, match=r"does not go through the model|does not build"):
        make_plan(recipe)


def test_meta_forward_matches_cpu_saved_bytes() -> None:
    """The planner's peft-free LoRA on the meta device: the same parameter counts as the real peft model and
    (within 10%; attention kernels differ between meta and CPU) the same bytes saved for backward."""
    from encdec.launcher.preflight.trace import count_parts, trace_activations

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    meta = build_meta_model(recipe)
    units = list(meta.sharding_units())
    t_meta = trace_activations(meta, (2, 6, 64, 64), units)
    torch.manual_seed(0)
    from encdec.models import build_model

    real = build_model(recipe.task, **recipe.model.factory_kwargs())
    params = {p.untyped_storage().data_ptr() for p in real.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        real.train()(torch.randn(2, 6, 64, 64))
    assert t_meta.total == pytest.approx(sum(saved.values()), rel=0.1)
    assert count_parts(meta) == count_parts(real)
    assert "peft" in sys.modules  # the real model imported it ...


def test_plan_does_not_import_peft() -> None:
    code = ("import sys\nfrom encdec.launcher.recipe.validate import load_recipe\nfrom encdec.launcher.preflight.plan import make_plan\n"
            f"make_plan(load_recipe({str(REPO / 'recipes' / 'prithvi_lora.yaml')!r}))\n"
            "print('peft' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cpu_workers_get_the_malloc_threshold_unless_the_user_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from encdec.launcher.ray.driver import MALLOC_ENV, run_spec, worker_env

    quick = REPO / "recipes" / "quickstart.yaml"
    recipe = load_recipe(quick, ["cluster.gpus_per_worker=0"])
    assert worker_env(recipe, {}) == {MALLOC_ENV: "131072"}
    monkeypatch.delenv(MALLOC_ENV, raising=False)
    assert run_spec(recipe, Path("/runs/q-1"))["worker_env"] == f"{MALLOC_ENV}=131072"  # shown by --dry-run
    assert worker_env(recipe, {MALLOC_ENV: "65536"}) == {MALLOC_ENV: "65536"}  # the launching shell's value wins
    set_in_recipe = load_recipe(quick, ["cluster.gpus_per_worker=0",
                                        "cluster.runtime_env={env_vars: {MALLOC_MMAP_THRESHOLD_: '262144'}}"])
    assert worker_env(set_in_recipe, {}) == {}  # Ray merges the recipe's own env_vars in; nothing to add
    assert worker_env(load_recipe(quick, ["cluster.gpus_per_worker=0", "cluster.malloc_mmap_threshold=null"]), {}) == {}
    assert worker_env(load_recipe(quick, ["cluster.gpus_per_worker=1"]), {}) == {}  # GPU workers: left alone
    with pytest.raises(RecipeError, match=r"cluster\.malloc_mmap_threshold"):
        load_recipe(quick, ["cluster.malloc_mmap_threshold=-1"])
