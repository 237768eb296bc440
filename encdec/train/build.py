"""``build_run_model``: the one builder of "the run's model", for training, export, the plan and the
``--init-from`` pre-check (and next predict/evaluate).

Build order (each step needs the previous one):

1. build with the factory (``build_model``: the fused qkv is split and PEFT injected there when the model section
   has ``peft_config``), on the current default device or on ``device``;
2. load the pretrained backbone weights still pending (encoders built on the meta device keep their source; built
   on a real device they loaded at construction), mapped onto the split/PEFT layout;
3. ``init_from``: a TerraTorch (Lightning ``.ckpt``) checkpoint or a plain state-dict file, mapped onto the same
   layout;
4. the trainable set (``train.freeze_backbone`` / ``freeze_decoder``, never freezing PEFT adapters), checked.

On the meta device (the plan, the pre-checks, FSDP2 ranks whose shards come from rank 0) steps 2-3 are skipped:
nothing is read. ``adapters="standin"`` replaces plain LoRA by a stand-in with the same parameters and saved
activations that does not import ``peft`` (seconds on a small machine): for the planner only.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

from encdec.config import ModelSection, TrainSection

__all__ = ["build_run_model", "load_init_from", "load_pretrained_weights"]


def load_pretrained_weights(net: nn.Module) -> list[str]:
    """Load pretrained backbone weights still pending. Returns what was loaded."""
    from encdec.models.backbones.prithvi_load import load_pretrained

    return load_pretrained(net)


def load_init_from(net: nn.Module, path: str) -> None:
    """Load a TerraTorch (Lightning ``.ckpt``) checkpoint or a plain state-dict file into the built model.

    Raises:
        encdec.models.terratorch_ckpt.CheckpointReadError: missing or unreadable file, or no weights in it.
        encdec.models.terratorch_ckpt.CheckpointMismatch: the checkpoint's keys or shapes do not fit the model.
    """
    from encdec.models.terratorch_ckpt import load_terratorch_weights, read_checkpoint

    load_terratorch_weights(net, read_checkpoint(path))


def build_run_model(
    task: str,
    model: ModelSection,
    train: TrainSection | None = None,
    *,
    device: str | torch.device | None = None,
    weights: bool = True,
    init_from: str | None = None,
    adapters: Literal["real", "standin"] = "real",
) -> nn.Module:
    """Build the run's model: build, load pretrained, ``init_from``, PEFT, trainable set (module docstring).

    Args:
        task: the recipe's task.
        model: the ``model:`` section (``model.without_pretrained()`` for builds that must read no weights file).
        train: the ``train:`` section (its freeze flags); None leaves the trainable set as the build made it
            (base frozen and adapters trainable under PEFT, everything trainable otherwise), still checked.
        device: build under ``torch.device(device)`` (``"meta"``: no memory, nothing read); None: the current
            default device or context (the strategy's ``build_context``).
        weights: load pretrained weights and ``init_from`` (skipped anyway for a model on the meta device).
        init_from: checkpoint to start from (step 3).
        adapters: ``real`` (peft) or ``standin`` (plain LoRA without importing peft; the planner).

    Raises:
        encdec.models.FactoryError, encdec.models.peft.PeftConfigError: the model does not build.
        encdec.models.peft.TrainableSetError: nothing trainable, or adapters frozen.
    """
    from encdec.models import build_model
    from encdec.models.peft import set_trainable
    from encdec.models.peft.standin import apply_standin_lora, supports_standin

    kwargs = model.factory_kwargs()
    standin = adapters == "standin" and supports_standin(model.peft_config)
    if standin:
        kwargs.pop("peft_config")
    where = torch.device(device) if device is not None else contextlib.nullcontext()
    with where:
        net = build_model(task, **kwargs)
        if standin and model.peft_config is not None:
            apply_standin_lora(net.encoder, model.peft_config)  # type: ignore[arg-type]
    on_meta = any(p.is_meta for p in net.parameters())
    if weights and not on_meta:
        load_pretrained_weights(net)
        if init_from:
            load_init_from(net, init_from)
    set_trainable(net, freeze_backbone=bool(train and train.freeze_backbone),
                  freeze_decoder=bool(train and train.freeze_decoder))
    return net
