"""EncoderDecoderFactory: compose encoder + necks + decoder + head (+ auxiliary heads) for a task.

The contract is TerraTorch's (see ``shared/seed/encoder_decoder_factory.md``): a TerraTorch ``model_args``
block builds unchanged with ``build_model(task, **model_args)``. Differences that are deliberate:

* prefixed kwargs (``backbone_x``) and explicit dicts (``backbone_kwargs={"x": ...}``) are merged; a key given
  both ways is an error (TerraTorch silently ignores the prefixed ones when a dict is given);
* ``includes_head`` is honoured on the decoder class, its registry entry, or a module instance;
* an auxiliary head's own ``head_*`` arguments reach its head (TerraTorch drops them).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from encdec.config import TASKS
from encdec.models.heads import ClassificationHead, RegressionHead, ScalarHead, SegmentationHead
from encdec.models.model import (
    AuxiliaryHead,
    AuxiliaryHeadModule,
    NeckSequence,
    PixelWiseModel,
    ScalarOutputModel,
)
from encdec.registry import BACKBONE_REGISTRY, DECODER_REGISTRY, NECK_REGISTRY, Registry

__all__ = ["TASKS", "TASK_MODELS", "EncoderDecoderFactory", "FactoryError", "build_model"]

#: the model class of each task (the task names are ``encdec.config.TASKS``)
TASK_MODELS: dict[str, type[nn.Module]] = {
    "segmentation": PixelWiseModel,
    "regression": PixelWiseModel,
    "classification": ScalarOutputModel,
    "scalar_regression": ScalarOutputModel,
}


class FactoryError(ValueError):
    """The model arguments do not describe a buildable model."""


def _route(
    kwargs: dict[str, Any], explicit: Mapping[str, Any] | None, prefix: str
) -> dict[str, Any]:
    """Pop ``<prefix>_*`` keys out of ``kwargs`` and merge them with the explicit dict."""
    merged = dict(explicit or {})
    for key in [k for k in kwargs if k.startswith(prefix + "_")]:
        inner = key[len(prefix) + 1 :]
        if inner in merged:
            raise FactoryError(
                f"'{inner}' is given twice for the {prefix}: as {key}={kwargs[key]!r} and in "
                f"{prefix}_kwargs={{'{inner}': {merged[inner]!r}}}; keep one of them"
            )
        merged[inner] = kwargs.pop(key)
    return merged


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_decoder_args(decoder: str, kwargs: Mapping[str, Any], what: str) -> None:
    """Name the arguments a built-in decoder does not take, before its constructor raises a bare TypeError.

    External sources (smp) check their own arguments; a constructor taking ``**kwargs`` accepts anything.
    """
    prefix, inner = DECODER_REGISTRY.find(decoder)
    source = DECODER_REGISTRY[prefix]
    if not isinstance(source, Registry):
        return
    params = list(inspect.signature(source[inner]).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    # the first parameter is the channel list the factory passes positionally
    accepted = [p.name for p in params[1:] if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        named = ", ".join(f"{k!r}{_did_you_mean(k, accepted)}" for k in unknown)
        raise FactoryError(
            f"{what} {decoder!r} does not take the argument(s) {named}; it takes {accepted}. Fix the spelling or "
            "remove them"
        )


def _includes_head(decoder: str | nn.Module) -> bool:
    if isinstance(decoder, nn.Module):
        return bool(getattr(decoder, "includes_head", False))
    if bool(DECODER_REGISTRY.metadata(decoder).get("includes_head", False)):
        return True
    prefix, inner = DECODER_REGISTRY.find(decoder)
    source = DECODER_REGISTRY[prefix]
    builder = source[inner] if hasattr(source, "__getitem__") else None
    return bool(getattr(builder, "includes_head", False))


def _build_backbone(backbone: str | nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(backbone, nn.Module):
        if kwargs:
            raise FactoryError(
                f"backbone arguments {sorted(kwargs)} were given but the backbone is an already-built module; "
                "pass a registry name instead, or build the module with those arguments yourself"
            )
        encoder = backbone
    elif isinstance(backbone, str):
        from encdec.models.backbone_args import not_implemented_note, unknown_backbone_args

        if backbone in BACKBONE_REGISTRY and (unknown := unknown_backbone_args(backbone, kwargs)):
            named = ", ".join(f"{k!r}" + (f" (did you mean {c!r}?)" if c else "") for k, c in unknown)
            why = not_implemented_note(backbone, (k for k, _ in unknown))
            raise FactoryError(f"backbone {backbone!r} does not take the argument(s) {named}{why}; fix the spelling "
                               "of backbone_<arg> or remove it")
        encoder = BACKBONE_REGISTRY.build(backbone, **kwargs)
    else:
        raise FactoryError(f"backbone must be a registry name or an nn.Module, got {type(backbone).__name__}")
    channels = getattr(encoder, "out_channels", None)
    if not isinstance(channels, (list, tuple)) or not all(isinstance(c, int) for c in channels):
        raise FactoryError(
            f"backbone {type(encoder).__name__} has no `out_channels: list[int]` (got {channels!r}); an encoder "
            "must expose the channel count of each feature its forward returns"
        )
    return encoder


def _build_necks(necks: list[dict[str, Any]] | None, channels: list[int]) -> tuple[NeckSequence, list[int]]:
    seq = NeckSequence()
    for i, spec in enumerate(necks or []):
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise FactoryError(
                f"necks[{i}] must be a mapping with a 'name' key (e.g. {{name: SelectIndices, indices: [-1]}}), "
                f"got {spec!r}"
            )
        args = {k: v for k, v in spec.items() if k != "name"}
        neck = NECK_REGISTRY.build(spec["name"], list(channels), **args)
        channels = list(neck.process_channel_list(list(channels)))
        seq.append(neck)
    return seq, channels


def _build_decoder(
    decoder: str | nn.Module, channels: list[int], kwargs: dict[str, Any], num_classes: int | None, what: str
) -> tuple[nn.Module, bool]:
    includes_head = _includes_head(decoder)
    if isinstance(decoder, nn.Module):
        if kwargs:
            raise FactoryError(f"{what} arguments {sorted(kwargs)} were given but the {what} is an already-built module")
        module = decoder
    else:
        if includes_head:
            if num_classes is None:
                raise FactoryError(
                    f"{what} {decoder!r} includes its head and needs num_classes; set num_classes in the model args"
                )
            kwargs = {"num_classes": num_classes, **kwargs}
        _check_decoder_args(decoder, kwargs, what)
        module = DECODER_REGISTRY.build(decoder, list(channels), **kwargs)
    if not includes_head and not isinstance(getattr(module, "out_channels", None), int):
        raise FactoryError(
            f"{what} {type(module).__name__} has no `out_channels: int`; a decoder must expose the channel count "
            "of its output so a head can be put after it"
        )
    return module, includes_head


def _build_head(task: str, in_channels: int, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    if task in ("segmentation", "classification"):
        if num_classes is None:
            raise FactoryError(f"task {task!r} needs num_classes (the number of output classes); set num_classes")
        cls = SegmentationHead if task == "segmentation" else ClassificationHead
        return cls(in_channels, num_classes, **kwargs)
    if num_classes is not None:  # regression: a TerraTorch-style num_classes means the number of outputs
        kwargs = {"num_outputs": num_classes, **kwargs}
    cls_r = RegressionHead if task == "regression" else ScalarHead
    return cls_r(in_channels, **kwargs)


def _as_aux(spec: AuxiliaryHead | Mapping[str, Any]) -> AuxiliaryHead:
    if isinstance(spec, AuxiliaryHead):
        return spec
    if isinstance(spec, Mapping) and {"name", "decoder"} <= set(spec) and set(spec) <= {"name", "decoder", "decoder_args"}:
        return AuxiliaryHead(spec["name"], spec["decoder"], spec.get("decoder_args"))
    raise FactoryError(
        f"aux_decoders entries must be AuxiliaryHead(name, decoder, decoder_args) or a mapping with keys "
        f"name, decoder and optional decoder_args; got {spec!r}"
    )


class EncoderDecoderFactory:
    """Builds ``PixelWiseModel`` / ``ScalarOutputModel`` from registry names or modules."""

    def build_model(
        self,
        task: str,
        backbone: str | nn.Module,
        decoder: str | nn.Module = "FCNDecoder",
        backbone_kwargs: dict[str, Any] | None = None,
        decoder_kwargs: dict[str, Any] | None = None,
        head_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        num_outputs: int | None = None,
        necks: list[dict[str, Any]] | None = None,
        aux_decoders: list[AuxiliaryHead] | None = None,
        rescale: bool = True,
        image_size_out: tuple[int, int] | None = None,
        peft_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        """Compose a model for ``task``.

        Args:
            task: ``segmentation`` / ``regression`` (pixel-wise) or ``classification`` / ``scalar_regression``.
            backbone: registry name (``prithvi_eo_v2_300``, ``timm_resnet18``...) or an encoder module with
                ``out_channels: list[int]`` whose forward returns a list of tensors.
            decoder: registry name (``UperNetDecoder``, ``smp_Unet``...) or a module with ``out_channels: int``.
            backbone_kwargs, decoder_kwargs, head_kwargs: constructor arguments; ``backbone_*``, ``decoder_*`` and
                ``head_*`` keyword arguments are routed here with the prefix stripped.
            num_classes: classes for segmentation/classification (outputs for regression).
            num_outputs: outputs of a regression task (TerraTorch's name; give it or num_classes, not both).
            necks: ``[{"name": ..., **kwargs}]`` applied in order between encoder and decoder. Without necks an
                encoder with ``prepare_features_for_image_model`` (Prithvi) turns its tokens into maps itself.
            aux_decoders: extra decoders + heads on the same necked features.
            rescale: interpolate pixel-wise outputs to the input size.
            image_size_out: (H, W) pixel-wise outputs are centre-cropped to (default: the input's).
            backbone_padding: (routed from ``backbone_*`` as in TerraTorch) how inputs are padded to a multiple of
                twice the patch size: a torch padding mode (default ``reflect``) or None for no padding.
            peft_config: ``{"method", "replace_qkv", "peft_config_kwargs"}``: split fused qkv and apply PEFT to
                the backbone (``encdec.models.peft``).

        Raises:
            FactoryError (a ValueError): unknown task, unused or doubled arguments, missing num_classes.
        """
        if not isinstance(task, str) or task.lower() not in TASK_MODELS:
            raise FactoryError(f"task {task!r} is not supported; use one of {', '.join(TASK_MODELS)} (any case)")
        task = task.lower()  # TerraTorch lower-cases the task too
        if num_outputs is not None:
            if num_classes is not None:
                raise FactoryError(
                    f"num_outputs={num_outputs!r} and num_classes={num_classes!r} are both given; give one of them "
                    "(num_outputs for regression, num_classes for segmentation/classification)"
                )
            num_classes = num_outputs
        backbone_kwargs = _route(kwargs, backbone_kwargs, "backbone")
        # TerraTorch reads the padding mode from the backbone arguments; it is the model's, not the encoder's
        padding = backbone_kwargs.pop("padding", "reflect")
        decoder_kwargs = _route(kwargs, decoder_kwargs, "decoder")
        head_kwargs = _route(kwargs, head_kwargs, "head")
        if kwargs:
            own = [p for p in inspect.signature(EncoderDecoderFactory.build_model).parameters if p not in ("self", "kwargs")]
            hints = "".join(f" {k!r}{_did_you_mean(k, own)}" for k in sorted(kwargs) if _did_you_mean(k, own))
            raise FactoryError(
                f"unused arguments {sorted(kwargs)}{hints}: build_model takes backbone_*, decoder_* and head_* prefixed "
                "arguments besides its named ones; check the spelling or add the right prefix"
            )

        encoder = _build_backbone(backbone, backbone_kwargs)
        if peft_config is not None:
            from encdec.models.peft import get_peft_backbone  # peft is imported only when asked for

            encoder = get_peft_backbone(peft_config, encoder)
        neck, channels = _build_necks(necks, [int(c) for c in encoder.out_channels])  # type: ignore[union-attr]
        dec, includes_head = _build_decoder(decoder, channels, decoder_kwargs, num_classes, "decoder")
        head = None if includes_head else _build_head(task, int(dec.out_channels), num_classes, head_kwargs)  # type: ignore[arg-type]
        if includes_head and head_kwargs:
            raise FactoryError(
                f"head arguments {sorted(head_kwargs)} were given but decoder {decoder!r} includes its own head"
            )

        aux_modules: dict[str, AuxiliaryHeadModule] = {}
        for raw in aux_decoders or []:
            aux = _as_aux(raw)
            args = dict(aux.decoder_args or {})
            aux_head_kwargs = _route(args, None, "head")
            aux_dec_kwargs = _route(args, None, "decoder")
            for key in list(args):  # unprefixed keys are decoder arguments too
                if key in aux_dec_kwargs:
                    raise FactoryError(f"aux decoder {aux.name!r}: '{key}' is given twice (with and without decoder_)")
                aux_dec_kwargs[key] = args.pop(key)
            if aux.name in aux_modules:
                raise FactoryError(f"aux decoder name {aux.name!r} is used twice; names must be unique")
            aux_dec, aux_inc = _build_decoder(aux.decoder, channels, aux_dec_kwargs, num_classes, f"aux decoder {aux.name!r}")
            aux_head = None if aux_inc else _build_head(task, int(aux_dec.out_channels), num_classes, aux_head_kwargs)  # type: ignore[arg-type]
            aux_modules[aux.name] = AuxiliaryHeadModule(aux_dec, aux_head)

        model_cls = TASK_MODELS[task]
        if model_cls is ScalarOutputModel:
            if image_size_out is not None:
                raise FactoryError(
                    f"image_size_out={image_size_out!r} applies to pixel-wise tasks only; task {task!r} returns one "
                    "value per image: remove it"
                )
            return model_cls(task, encoder, dec, head, neck=neck, aux_heads=aux_modules, padding=padding)
        return model_cls(task, encoder, dec, head, neck=neck, aux_heads=aux_modules, rescale=rescale,
                         padding=padding, image_size_out=image_size_out)


def build_model(task: str, backbone: str | nn.Module, decoder: str | nn.Module = "FCNDecoder", **kwargs: Any) -> nn.Module:
    """Shortcut for ``EncoderDecoderFactory().build_model(...)``."""
    return EncoderDecoderFactory().build_model(task, backbone, decoder, **kwargs)
