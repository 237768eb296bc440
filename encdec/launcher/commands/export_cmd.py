"""``encdec-launch export RUN_DIR``: the consolidated model of a run, loadable by a plain ``build_model``.

The run's checkpoint (the best by the validation metric, else the latest) is restored in one process exactly as
a resume would (same build order: build -> pretrained weights -> qkv split + PEFT -> trainable set -> strategy
``none`` for DCP checkpoints of none/ddp/fsdp, ``deepspeed`` at world size 1 for ZeRO ones), then LoRA is merged
and q/k/v re-fused (``encdec.models.export.merge_and_export``). Written to ``RUN_DIR/export/``:

* ``model.safetensors``: the plain state dict (``strict=True`` into the model block below);
* ``model.yaml``: ``task``, the ``model`` block without ``peft_config`` (what builds the plain model), the
  ``data`` block predict preprocesses scenes with (:func:`inference_data`) and ``class_names`` when the recipe
  names them (``data.class_names``);
* ``prithvi_backbone.safetensors`` with ``--official-prithvi``: the backbone in the official key layout.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from encdec.launcher.recipe.errors import LaunchError

__all__ = ["checkpoint_arg", "export_command", "export_run", "inference_data", "official_prithvi_check", "pick_checkpoint"]


def pick_checkpoint(run_dir: Path, recipe: Any) -> Path:
    """The best checkpoint by the run's validation metric, else the latest complete one."""
    from encdec.train.checkpoint import CheckpointManager, find_latest_checkpoint

    train = recipe.train
    root = run_dir / "checkpoints"
    manager = CheckpointManager(root, keep_last=train.keep_last, best_metric=train.best_metric_for(recipe.task),
                                best_mode=train.best_mode_for(recipe.task))
    ckpt = manager.best() or find_latest_checkpoint(root)
    if ckpt is None:
        raise LaunchError(f"{run_dir} has no complete checkpoint under checkpoints/; train first "
                          f"(encdec-launch --resume {run_dir})")
    return ckpt


def checkpoint_arg(run_dir: Path, checkpoint: str | Path) -> Path:
    """``--checkpoint``: a complete checkpoint directory, given as a path or by its name under RUN/checkpoints."""
    from encdec.train.checkpoint import is_complete, list_checkpoints

    given = Path(checkpoint)
    for candidate in (given, run_dir / "checkpoints" / given):
        if candidate.is_dir() and is_complete(candidate):
            return candidate
    names = [p.name for _, p in list_checkpoints(run_dir / "checkpoints")]
    found = "incomplete (no finished meta.json)" if any(c.is_dir() for c in (given, run_dir / "checkpoints" / given)) \
        else "not found"
    raise LaunchError(f"--checkpoint {checkpoint}: {found}; the run's complete checkpoints are "
                      f"{', '.join(names) if names else 'none yet'} (give one of them, or leave --checkpoint out "
                      "for the best, else the latest)")


def official_prithvi_check(recipe: Any) -> None:
    """``--official-prithvi`` writes the backbone in the official Prithvi-EO-2.0 key layout: Prithvi models only."""
    from encdec.models.backbones.prithvi import VARIANTS

    name = recipe.model.backbone
    if name not in VARIANTS:
        raise LaunchError(f"--official-prithvi: model.backbone={name!r} is not a Prithvi-EO-2.0 backbone (allowed: "
                          f"{', '.join(VARIANTS)}); drop the flag, the export's model.safetensors holds the whole model")


def _single_process_group() -> None:
    """DeepSpeed needs a process group even alone: a gloo group of one on a free local port."""
    from encdec.distributed.process_group import ensure_process_group

    ensure_process_group("gloo")


def restore(run_dir: Path, recipe: Any, ckpt: Path) -> Any:
    """The run's model with ``ckpt`` loaded, in this process (the unwrapped module)."""
    from encdec.distributed import make_strategy
    from encdec.train.build import build_run_model
    from encdec.train.checkpoint import read_meta
    from encdec.train.loop_parts import seed_everything, strategy_options

    meta = read_meta(ckpt)
    name = "deepspeed" if meta.get("strategy") == "deepspeed" else "none"
    if name == "deepspeed":
        _single_process_group()
    seed_everything(recipe.run.seed)  # adapter-only checkpoints rebuild the frozen base from the seed/weights
    # an adapter-only checkpoint holds no frozen weights: they came from init_from, as in the run itself
    init_from = recipe.run.init_from if meta.get("adapter_only") else None
    net = build_run_model(recipe.task, recipe.model, recipe.train, init_from=init_from)
    opts = strategy_options(recipe.train, peft=recipe.model.peft_config is not None,
                            global_batch_size=recipe.data.global_batch_size, grad_accum=1, world_size=1)
    strategy = make_strategy(name, **opts)
    strategy.setup(net, recipe.optim, precision="fp32", grad_accum=1, activation_checkpointing=False)
    strategy.load(ckpt)
    return strategy.module


def inference_data(recipe: Any) -> dict[str, Any]:
    """What predict needs to turn a file's pixels into this model's input, exactly as training did
    (``encdec.data.preprocess``): bands, the statistics in use (the HLS defaults resolved), ``constant_scale``,
    ``dataset_bands``, ``no_data_replace``, ``img_size``, ``num_frames``."""
    data = recipe.data
    means, stds = data.stats()
    return {"bands": list(data.bands), "means": list(means), "stds": list(stds),
            "constant_scale": data.constant_scale, "dataset_bands": data.dataset_bands,
            "no_data_replace": data.no_data_replace, "img_size": data.img_size, "num_frames": data.num_frames}


def export_run(run_dir: str | Path, *, checkpoint: str | Path | None = None, out: str | Path | None = None,
               official_prithvi: bool = False) -> Path:
    """Write the consolidated model of a run; returns the ``model.safetensors`` path.

    Raises:
        LaunchError: not a run directory, or no checkpoint.
    """
    import torch
    from safetensors.torch import save_file

    from encdec.launcher.recipe.validate import load_recipe
    from encdec.launcher.rundir import RECIPE_FILE, is_run_dir
    from encdec.models.export import merge_and_export, to_official_prithvi
    from encdec.train.build import build_run_model

    run_dir = Path(run_dir).resolve()
    if not is_run_dir(run_dir):
        raise LaunchError(f"{run_dir} is not a run directory (no {RECIPE_FILE})")
    recipe = load_recipe(run_dir / RECIPE_FILE)
    if official_prithvi:
        official_prithvi_check(recipe)
    ckpt = checkpoint_arg(run_dir, checkpoint) if checkpoint else pick_checkpoint(run_dir, recipe)
    module = restore(run_dir, recipe, ckpt)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in merge_and_export(module).items()}
    plain_section = recipe.model.without_peft()
    plain_block = plain_section.factory_kwargs()
    plain_block.pop("backbone_pretrained", None)
    # Check the promise before writing: the merged weights load strictly into the plain model.
    plain = build_run_model(recipe.task, plain_section.without_pretrained(), device="meta")
    plain.load_state_dict(state, strict=True, assign=True)

    out_dir = Path(out) if out else run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.safetensors"
    tmp = out_dir / "model.safetensors.part"
    save_file(state, str(tmp), metadata={"run": run_dir.name, "checkpoint": ckpt.name, "task": recipe.task})
    os.replace(tmp, target)
    doc: dict[str, Any] = {"task": recipe.task, "model": {**plain_block, "backbone_pretrained": False},
                           "data": inference_data(recipe)}
    if recipe.data.class_names:  # predict reads them for its tags, legends and probability bands
        doc["class_names"] = list(recipe.data.class_names)
    (out_dir / "model.yaml").write_text(
        f"# load with: build_model(task, **model) then load_state_dict(safetensors.torch.load_file("
        f"'{target.name}'), strict=True)\n# from {ckpt}\n" + yaml.safe_dump(doc, sort_keys=False)
    )
    if official_prithvi:
        save_file(to_official_prithvi(state), str(out_dir / "prithvi_backbone.safetensors"))
    return target


def export_command(args: argparse.Namespace) -> int:
    """CLI body of ``encdec-launch export``."""
    path = export_run(args.run_dir, checkpoint=args.checkpoint, out=args.out, official_prithvi=args.official_prithvi)
    print(f"wrote {path} and {path.with_name('model.yaml')}")
    return 0
