"""The ``model:`` section: exactly ``build_model``'s keyword arguments (a TerraTorch ``model_args`` block pastes in
unchanged), with its necks, auxiliary decoders and PEFT block."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from encdec.config.base import Section

__all__ = ["MODEL_PREFIXES", "AuxDecoderSpec", "ModelSection", "NeckSpec", "PeftSection"]

MODEL_PREFIXES = ("backbone_", "decoder_", "head_")


class NeckSpec(BaseModel):
    """One neck: ``{name: SelectIndices, indices: [5, 11, 17, 23]}``; keys besides ``name`` are its arguments."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Neck name in NECK_REGISTRY (e.g. SelectIndices, ReshapeTokensToImage).")


class AuxDecoderSpec(Section):
    """An auxiliary decoder + head on the same necked features (TerraTorch's AuxiliaryHead)."""

    name: str = Field(description="Unique name of the auxiliary head (its loss/metrics are reported under it).")
    decoder: str = Field(description="Decoder name in DECODER_REGISTRY.")
    decoder_args: dict[str, Any] | None = Field(
        None, description="Decoder arguments; head_* keys go to its own head."
    )


class PeftSection(Section):
    """PEFT on the backbone, applied after the fused-qkv split."""

    method: Literal["LORA"] = Field("LORA", description="PEFT method (peft's PeftType name); LORA is supported.")
    replace_qkv: str | None = Field(
        None,
        description="Substring naming fused qkv Linear(D, 3D) modules to split into q_linear/k_linear/v_linear "
        "before PEFT ('qkv' for Prithvi), so LoRA can target q and v alone.",
    )
    peft_config_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Arguments of peft's LoraConfig: target_modules, r, lora_alpha, lora_dropout, ...",
    )


class ModelSection(BaseModel):
    """Exactly ``build_model``'s keyword arguments (a TerraTorch ``model_args`` block pastes in unchanged).

    Besides the named fields, keys prefixed ``backbone_``, ``decoder_`` or ``head_`` are routed to that part with
    the prefix stripped, e.g. ``backbone_pretrained``, ``backbone_ckpt_path``, ``backbone_bands``,
    ``backbone_num_frames``, ``decoder_channels``, ``head_dropout``. Any other key is an error.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    backbone: str = Field(description="Backbone name: prithvi_eo_v2_300, prithvi_eo_tiny, timm_resnet18, ...")
    decoder: str = Field("FCNDecoder", description="Decoder name: UperNetDecoder, FCNDecoder, UNetDecoder, smp_Unet, ...")
    backbone_kwargs: dict[str, Any] | None = Field(None, description="Backbone constructor arguments.")
    decoder_kwargs: dict[str, Any] | None = Field(None, description="Decoder constructor arguments.")
    head_kwargs: dict[str, Any] | None = Field(None, description="Head constructor arguments (dropout, ...).")
    num_classes: int | None = Field(
        None, ge=1, description="Classes (segmentation/classification) or outputs (regression)."
    )
    necks: list[NeckSpec] | None = Field(None, description="Necks applied in order between encoder and decoder.")
    aux_decoders: list[AuxDecoderSpec] | None = Field(None, description="Auxiliary decoders + heads.")
    rescale: bool = Field(True, description="Interpolate pixel-wise outputs to the input size.")
    image_size_out: tuple[int, int] | None = Field(
        None, description="Pixel-wise tasks: interpolate outputs to this [H, W] instead of the input size."
    )
    peft_config: PeftSection | None = Field(None, description="PEFT (LoRA) on the backbone; null = full fine-tune.")

    @model_validator(mode="before")
    @classmethod
    def _num_outputs_alias(cls, data: Any) -> Any:
        """TerraTorch's ``num_outputs`` (regression blocks) is ``num_classes`` here: one name downstream."""
        from pydantic_core import PydanticCustomError

        if isinstance(data, dict) and "num_outputs" in data:
            data = dict(data)
            value = data.pop("num_outputs")
            if data.get("num_classes") is not None and value is not None:
                raise PydanticCustomError(
                    "num_outputs_alias", "num_outputs={value} and num_classes={classes} are both given; give one of them",
                    {"value": value, "classes": data["num_classes"]},
                )
            if value is not None:
                data["num_classes"] = value
        return data

    @model_validator(mode="after")
    def _prefixed_extras(self) -> ModelSection:
        from pydantic_core import PydanticCustomError

        for key in self.model_extra or {}:
            if not key.startswith(MODEL_PREFIXES):
                raise PydanticCustomError(
                    "model_key",
                    "'{key}' is not a build_model argument",
                    {"key": key, "fields": sorted(type(self).model_fields)},
                )
        return self

    def factory_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``build_model(task, **kwargs)`` (unset optional fields left out)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="python")
            elif isinstance(value, list):
                value = [v.model_dump(mode="python") if isinstance(v, BaseModel) else v for v in value]
            out[name] = copy.deepcopy(value)
        out.update(copy.deepcopy(dict(self.model_extra or {})))
        return out

    def backbone_arg(self, key: str, default: Any = None) -> Any:
        """A backbone argument given either as ``backbone_<key>`` or in ``backbone_kwargs``."""
        extra = self.model_extra or {}
        if f"backbone_{key}" in extra:
            return extra[f"backbone_{key}"]
        return (self.backbone_kwargs or {}).get(key, default)


    def without_pretrained(self) -> ModelSection:
        """A copy that reads no weights file: ``pretrained`` false, ``ckpt_path`` dropped (meta builds, checks)."""
        extra = {k: v for k, v in (self.model_extra or {}).items() if k != "backbone_ckpt_path"}
        if "backbone_pretrained" in extra:
            extra["backbone_pretrained"] = False
        inner = None
        if self.backbone_kwargs is not None:
            inner = {k: v for k, v in self.backbone_kwargs.items() if k != "ckpt_path"}
            if "pretrained" in inner:
                inner["pretrained"] = False
        fields = {k: getattr(self, k) for k in type(self).model_fields}
        return type(self).model_validate({**fields, **extra, "backbone_kwargs": inner})

    def without_peft(self) -> ModelSection:
        """A copy without ``peft_config``: the plain model an export loads into."""
        fields = {k: getattr(self, k) for k in type(self).model_fields}
        return type(self).model_validate({**fields, **(self.model_extra or {}), "peft_config": None})
