"""Backbones: Prithvi-EO-2.0 (built in) and the lazy timm source (``timm_<name>``)."""

from encdec.models.backbones import prithvi, timm_source  # noqa: F401  (registration side effects)
