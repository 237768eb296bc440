"""timm models as a lazy source of BACKBONE_REGISTRY (``timm_resnet18``, ``timm_convnext_tiny``...).

Each model is built with ``features_only=True`` so it returns a feature pyramid and reports ``out_channels``;
ViTs use timm's intermediate-layer path and give ``[B, D, H/16, W/16]`` maps. Multi-band input via ``in_chans``
(or ``bands``, whose length sets ``in_chans``). No weights are downloaded: ``pretrained=True`` needs either
timm's local cache or ``ckpt_path`` (a local file), otherwise it fails with timm's own error.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from encdec.registry import BACKBONE_REGISTRY


class TimmEncoder(nn.Module):
    """A timm model as an encoder: ``forward(x) -> list[Tensor]``, ``out_channels: list[int]``.

    Args:
        model_name: timm model name (``timm.list_models()``).
        pretrained: load pretrained weights (from ``ckpt_path`` when given, else timm's cache/hub).
        ckpt_path: local weights file for ``pretrained`` (timm's ``pretrained_cfg_overlay=dict(file=...)``).
        in_chans: input channels; defaults to ``len(bands)`` when bands are given, else 3.
        bands: band names/indices of the input (recorded; sets ``in_chans``).
        out_indices: which stages to return (timm's default: all).
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``img_size`` for ViTs).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        ckpt_path: str | None = None,
        in_chans: int | None = None,
        bands: Sequence[str | int] | None = None,
        out_indices: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        if bands is not None and in_chans is not None and len(bands) != in_chans:
            raise ValueError(
                f"timm backbone {model_name!r}: bands has {len(bands)} entries but in_chans={in_chans}; give one of them"
            )
        self.bands = list(bands) if bands is not None else None
        chans = in_chans if in_chans is not None else (len(bands) if bands is not None else 3)
        if kwargs.pop("features_only", True) is not True:
            raise ValueError(f"timm backbone {model_name!r}: features_only must stay True for an encoder")
        if ckpt_path is not None:
            pretrained = True
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": ckpt_path}
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=pretrained, features_only=True, in_chans=chans, **kwargs)
        info: Any = self.model.feature_info
        self.out_channels: list[int] = [int(c) for c in info.channels()]
        self.reductions: list[int] = [int(r) for r in info.reduction()]
        # Not named ``patch_size``: the factory's models pad to the first ``patch_size`` they find among the
        # encoder's modules, as TerraTorch does; a CNN has none (no padding), a timm ViT its ``patch_embed``'s.
        self.max_reduction = max(self.reductions)

    def forward(self, x: Tensor, **_: Any) -> list[Tensor]:
        return list(self.model(x))


class TimmSource:
    """Lazy timm source: importing encdec does not import timm's model zoo."""

    def names(self) -> list[str]:
        import timm

        return list(timm.list_models())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        import timm

        return bool(timm.is_model(name))

    def metadata(self, name: str) -> Mapping[str, Any]:
        return {"source": "timm", "model_name": name}

    def build(self, name: str, *args: Any, **kwargs: Any) -> TimmEncoder:
        return TimmEncoder(name, *args, **kwargs)

    def accepted_args(self, name: str) -> list[str] | None:
        """What ``timm_<name>`` takes without building it: TimmEncoder's own arguments, ``timm.create_model``'s and
        ``build_model_with_cfg``'s, and the constructor arguments of the model classes in the model's timm module
        (those with ``forward_features``; a feature class too). None when one of them takes ``**kwargs``."""
        import importlib

        import timm
        from timm.models import _builder, _registry

        module_name = _registry._model_to_module.get(name)  # the entrypoint's module, e.g. "resnet"
        if module_name is None:
            return None
        module = importlib.import_module(f"timm.models.{module_name}")
        classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, nn.Module)
                   and c.__module__ == module.__name__ and hasattr(c, "forward_features")]
        if not classes:
            return None
        names = {"pretrained", "ckpt_path", "in_chans", "bands", "out_indices", "features_only",
                 "pretrained_cfg_overlay", "feature_cls", "feature_cfg", "output_stride", "flatten_sequential"}
        # the module's own factories (_create_resnet, _gen_mobilenet_v3...) consume some arguments before the class
        helpers: list[Any] = [f for n, f in vars(module).items()
                              if inspect.isfunction(f) and n.startswith(("_create", "_gen"))]
        passing: tuple[Any, ...] = (timm.create_model, _builder.build_model_with_cfg, *helpers)
        for fn in (*passing, *[c.__init__ for c in classes]):
            params = inspect.signature(fn).parameters.values()
            if fn not in passing and any(
                    p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                return None
            names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return sorted(names - {"self", "model_name", "model_cls", "variant", "kwargs"})


TIMM_SOURCE = TimmSource()
BACKBONE_REGISTRY.register_source("timm", TIMM_SOURCE)
