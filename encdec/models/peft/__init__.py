"""PEFT on the backbone after splitting fused qkv: ``get_peft_backbone(peft_config, encoder)``.

``peft_config`` is TerraTorch's dict::

    {"method": "LORA", "replace_qkv": "qkv",
     "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 16, "lora_alpha": 16}}

Every ``Linear(D, 3D)`` whose name contains ``replace_qkv`` becomes a :class:`QKVSep` (``q_linear``, ``k_linear``,
``v_linear``, same output), the ``peft`` library injects the adapters, the base backbone is frozen and only the
adapters train in it. Neck, decoder and head are built after this by the factory and stay fully trainable.

Why ``peft.inject_adapter_in_model`` and not ``get_peft_model`` (TerraTorch's choice): ``get_peft_model`` wraps the
encoder in a ``PeftModel``, which moves every key under ``base_model.model.`` (the official/TerraTorch encoder
layout and our Prithvi loader address ``encoder.blocks.N...``), changes the encoder's type, and reaches
``out_channels``/``blocks``/``patch_size`` only through ``__getattr__`` forwarding; its extras (``save_pretrained``,
task types, generation) serve Hugging Face language models, not a backbone inside our model. Injection mutates
the encoder in place: same class, attributes, forward (``temporal_coords``/``location_coords`` pass straight
through), ``blocks`` for per-block FSDP2 and activation checkpointing, and keys that differ from the plain model
only inside adapted layers (``q_linear.base_layer.weight``, ``q_linear.lora_A.default.weight``). What the wrapper
would give we do per layer with peft's own code: merging (``export.merge_and_export`` calls each layer's
``merge``) and adapter-only checkpoints (``export.trainable_state_dict``, which also reads TerraTorch's
``base_model.model.`` keys). The cost: tuners that keep state on the wrapper (VeRA) cannot be injected; they are
refused with the reason.

Build order on the meta device (the engine's path): build (meta) -> ``to_empty`` -> initialise ->
``load_pretrained`` (fused ``qkv`` keys land in the split, adapted layers: :class:`QKVSep` and a load pre-hook on
each adapted layer map them) -> :func:`reset_adapters` (after ``to_empty`` adapter tensors are garbage; DoRA's
magnitude depends on the loaded base) -> :func:`check_trainable` -> shard -> optimizer.
"""

from encdec.models.peft.config import (
    ADAPTER_KEY_MARKERS,
    METHODS,
    UNSUPPORTED,
    ParsedPeftConfig,
    PeftConfigError,
    TrainableSetError,
    parse_peft_config,
)
from encdec.models.peft.inject import get_peft_backbone
from encdec.models.peft.qkv import QKVSep, replace_qkv
from encdec.models.peft.reset import _layer_adapters, reset_adapters
from encdec.models.peft.trainable import (
    PARTS,
    PartCount,
    adapter_parameter_names,
    adapter_state_keys,
    check_trainable,
    freeze_backbone,
    is_adapter_key,
    parameter_report,
    set_trainable,
    tuner_layers,
)

__all__ = [
    "ADAPTER_KEY_MARKERS", "METHODS", "PARTS", "UNSUPPORTED", "ParsedPeftConfig", "PartCount", "PeftConfigError",
    "QKVSep", "TrainableSetError", "_layer_adapters", "adapter_parameter_names", "adapter_state_keys",
    "check_trainable", "freeze_backbone", "get_peft_backbone", "is_adapter_key",
    "parameter_report", "parse_peft_config", "replace_qkv", "reset_adapters", "set_trainable", "tuner_layers",
]
