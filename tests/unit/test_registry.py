"""Registry and MultiSourceRegistry semantics (TerraTorch call shapes, errors, lazy sources)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from encdec import BACKBONE_REGISTRY, DECODER_REGISTRY, NECK_REGISTRY, NECKS_REGISTRY, MultiSourceRegistry, Registry
from encdec.registry import RegistryError, UnknownNameError


def test_register_decorator_keys_by_name_and_keeps_object() -> None:
    reg = Registry("thing")

    @reg.register
    def alpha(x: int = 1) -> int:
        return x * 2

    @reg.register(name="beta", embed_dim=768, includes_head=True)
    class Beta:
        def __init__(self, y: int) -> None:
            self.y = y

    assert alpha(3) == 6  # the decorator returns the function unchanged
    assert "alpha" in reg and "beta" in reg and "Beta" not in reg
    assert reg.names() == ["alpha", "beta"]
    assert reg.build("alpha", x=5) == 10
    assert reg.build("beta", 4).y == 4
    assert reg.metadata("beta") == {"embed_dim": 768, "includes_head": True}
    assert len(reg) == 2 and list(reg) == ["alpha", "beta"]


def test_duplicate_name_raises() -> None:
    reg = Registry("thing")
    reg.register(lambda: 1, name="a")
    with pytest.raises(RegistryError, match="'a' is already registered"):
        reg.register(lambda: 2, name="a")


@pytest.mark.parametrize("bad", ["UperNetDecoder", 3])
def test_register_non_callable_is_a_type_error_and_a_registry_error(bad: object) -> None:
    reg = Registry("decoder")
    for call in (lambda: reg.register(bad), lambda: reg.register(name="x")(bad)):
        with pytest.raises(TypeError, match=r"not callable; register a class or a function") as info:
            call()
        assert isinstance(info.value, RegistryError)
    multi = MultiSourceRegistry("decoder", builtin=reg)
    with pytest.raises(TypeError, match="not callable"):
        multi.register("UperNetDecoder")  # type: ignore[arg-type]
    assert reg.names() == []


def test_unknown_name_suggests_close_match() -> None:
    reg = Registry("decoder")
    reg.register(lambda: 1, name="UperNetDecoder")
    with pytest.raises(UnknownNameError, match=r"decoder 'UperNetDecodr' is not registered\. Did you mean 'UperNetDecoder'\?"):
        reg.build("UperNetDecodr")
    with pytest.raises(KeyError):  # also a KeyError for dict-style callers
        reg.build("nope")


def test_constructor_errors_propagate_unchanged() -> None:
    reg = Registry("thing")

    @reg.register
    def broken(**kwargs: object) -> None:
        raise TypeError("broken() got an unexpected keyword argument 'zzz'")

    with pytest.raises(TypeError, match="unexpected keyword argument 'zzz'"):
        reg.build("broken", zzz=1)


def test_multisource_prefix_order_and_source_access() -> None:
    first, second = Registry("b"), Registry("b")
    first.register(lambda: "first-x", name="x")
    second.register(lambda: "second-x", name="x")
    second.register(lambda: "second-y", name="y")
    multi = MultiSourceRegistry("b", mine=first)
    multi.register_source("ext", second)
    assert multi.build("x") == "first-x"  # built-in first
    assert multi.build("ext_x") == "second-x"  # prefix addresses the source
    assert multi.build("y") == "second-y"
    assert multi["ext"] is second
    assert "ext_y" in multi and "y" in multi and "z" not in multi
    assert multi.find("ext_y") == ("ext", "y")
    assert multi.names() == ["x", "ext_x", "ext_y"]
    with pytest.raises(RegistryError, match="already registered"):
        multi.register_source("ext", second)
    with pytest.raises(UnknownNameError, match=r"tried: mine, ext.*Did you mean 'ext_y'"):
        multi.build("ext_yy")

    @multi.register(name="z", patch_size=16)
    def z() -> str:
        return "z"

    assert multi.build("z") == "z" and multi.metadata("z") == {"patch_size": 16}


def test_global_registries_and_alias() -> None:
    assert NECKS_REGISTRY is NECK_REGISTRY
    assert "timm" in BACKBONE_REGISTRY.sources and "smp" in DECODER_REGISTRY.sources
    assert "timm_resnet18" in BACKBONE_REGISTRY
    assert "smp_Unet" in DECODER_REGISTRY and "smp_NotADecoder" not in DECODER_REGISTRY
    with pytest.raises(UnknownNameError, match="Did you mean 'timm_resnet18'"):
        BACKBONE_REGISTRY.build("timm_resnet1")


def test_import_encdec_is_lazy() -> None:
    code = (
        "import sys, encdec\n"
        "heavy = [m for m in ('ray', 'deepspeed', 'segmentation_models_pytorch', 'rasterio', 'timm.models') "
        "if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
