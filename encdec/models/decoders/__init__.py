"""Decoders: built-in FCN, UperNet, UNet, Identity, Linear, and the lazy smp source (``smp_<Name>``)."""

from encdec.models.decoders import fcn, identity, linear, smp_source, unet, upernet  # noqa: F401
