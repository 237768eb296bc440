"""Loading Prithvi-EO-2.0 checkpoints: the official MAE layout, plain state dicts, bands, strictness errors,
the meta-device path (``load_pretrained`` after ``to_empty``), the Hugging Face cache and PEFT-modified encoders.

The checkpoints are written here in the official layout: encoder keys under ``encoder.`` exactly as in
``Prithvi_EO_V2_300M.pt`` (and TerraTorch's ``PrithviMAE.state_dict()``), plus ``encoder.pos_embed`` and the
MAE decoder's keys, which the loader must drop.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from encdec.models.backbones.prithvi import (
    PrithviCheckpointError,
    PrithviViT,
    PrithviWeightsUnavailableError,
    build_prithvi,
    load_pretrained,
)
from encdec.models.backbones.prithvi_bands import DEFAULT_BANDS
from encdec.models.backbones.prithvi_load import CheckpointSource, load_checkpoint_into
from encdec.registry import BACKBONE_REGISTRY

# Non-block keys and block-0 keys of the official files (TerraTorch 1.2.11 PrithviMAE state dict, `_tl` variant).
OFFICIAL_ENCODER_KEYS = {
    "encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
    "encoder.temporal_embed_enc.scale", "encoder.location_embed_enc.scale", "encoder.norm.weight", "encoder.norm.bias",
    "encoder.blocks.0.norm1.weight", "encoder.blocks.0.norm1.bias", "encoder.blocks.0.attn.qkv.weight",
    "encoder.blocks.0.attn.qkv.bias", "encoder.blocks.0.attn.proj.weight", "encoder.blocks.0.attn.proj.bias",
    "encoder.blocks.0.norm2.weight", "encoder.blocks.0.norm2.bias", "encoder.blocks.0.mlp.fc1.weight",
    "encoder.blocks.0.mlp.fc1.bias", "encoder.blocks.0.mlp.fc2.weight", "encoder.blocks.0.mlp.fc2.bias",
}  # fmt: skip


def _randomised(name: str, **kwargs: object) -> PrithviViT:
    """A real encoder whose every tensor is off its init value (biases, norms and scales included)."""
    torch.manual_seed(0)
    enc = build_prithvi(name, **kwargs)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc.eval()


def _official_state(enc: PrithviViT, decoder_dim: int = 32) -> dict[str, torch.Tensor]:
    """``enc`` as an official MAE checkpoint: ``encoder.*`` (with pos_embed) plus the decoder's keys."""
    g = torch.Generator().manual_seed(1)
    sd = {"encoder." + k: v.clone() for k, v in enc.state_dict().items()}
    sd["encoder.pos_embed"] = enc.pos_embed.clone()
    d, n_tok = decoder_dim, enc.pos_embed.shape[1]
    shapes = {
        "decoder.mask_token": (1, 1, d),
        "decoder.decoder_pos_embed": (1, n_tok, d),
        "decoder.decoder_embed.weight": (d, enc.embed_dim),
        "decoder.decoder_embed.bias": (d,),
        "decoder.decoder_blocks.0.norm1.weight": (d,),
        "decoder.decoder_blocks.0.attn.qkv.weight": (3 * d, d),
        "decoder.decoder_blocks.0.mlp.fc1.weight": (4 * d, d),
        "decoder.decoder_norm.weight": (d,),
        "decoder.decoder_pred.weight": (enc.in_chans * 16 * 16, d),
    }
    if enc.temporal_encoding:
        shapes |= {"decoder.temporal_embed_dec.scale": (1,), "decoder.location_embed_dec.scale": (1,)}
    sd |= {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path) -> str:
    torch.save(sd, path)
    return str(path)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_encoder_keys_are_the_official_names() -> None:
    with torch.device("meta"):
        enc = BACKBONE_REGISTRY.build("prithvi_eo_v2_tiny_tl")
    ours = {"encoder." + k for k in enc.state_dict() if ".blocks." not in "." + k or k.startswith("blocks.0.")}
    assert ours == OFFICIAL_ENCODER_KEYS  # pos_embed included: a persistent buffer, as in the official files
    assert len(enc.state_dict()) == 8 + 12 * 12  # cls, pos_embed, patch w/b, 2 scales, norm w/b + 12 per block


@pytest.mark.parametrize("name", ["prithvi_eo_tiny", "prithvi_eo_v2_tiny_tl"])
def test_official_layout_round_trip(name: str, tmp_path: Path) -> None:
    src = _randomised(name, img_size=32)
    path = _save(_official_state(src), tmp_path / "official.pt")
    enc = BACKBONE_REGISTRY.build(name, pretrained=True, ckpt_path=path, img_size=32).eval()
    _assert_same_weights(src, enc)
    x = torch.randn(2, 6, 32, 32)
    kw = {"temporal_coords": torch.tensor([[[2021.0, 100.0]]] * 2), "location_coords": torch.tensor([[10.0, 20.0]] * 2)}
    kw = kw if src.temporal_encoding else {}
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(src(x, **kw), enc(x, **kw)))


def test_plain_state_dict_and_v1_style_keys(tmp_path: Path) -> None:
    src = _randomised("prithvi_eo_tiny", img_size=32)
    plain = _save(src.state_dict(), tmp_path / "plain.pt")
    _assert_same_weights(src, build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path=plain, img_size=32))
    # TerraTorch's PrithviViT state dict carries pos_embed; V1 files keep decoder keys at the top level
    v1 = {**src.state_dict(), "pos_embed": torch.zeros(1, 5, 256), "mask_token": torch.zeros(1, 1, 8),
          "decoder_embed.weight": torch.zeros(8, 256), "decoder_pos_embed": torch.zeros(1, 5, 8)}
    wrapped = _save({"state_dict": v1}, tmp_path / "v1.pt")
    _assert_same_weights(src, build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path=wrapped, img_size=32))


def test_bands_subset_extension_and_order(tmp_path: Path) -> None:
    src = _randomised("prithvi_eo_tiny", img_size=32)
    path = _save(_official_state(src), tmp_path / "official.pt")
    w = src.patch_embed.proj.weight
    sub = build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path=path, img_size=32, bands=["RED", "GREEN", "BLUE"])
    assert torch.equal(sub.patch_embed.proj.weight, w[:, [2, 1, 0]])
    assert torch.equal(sub.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    ext = build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path=path, img_size=32,
                        bands=[*DEFAULT_BANDS, "COASTAL_AEROSOL", 99])
    we = ext.patch_embed.proj.weight
    assert we.shape[1] == 8 and torch.equal(we[:, :6], w)
    for new in (6, 7):  # fresh xavier-uniform columns, not copies of pretrained ones
        assert all(not torch.allclose(we[:, new], w[:, i]) for i in range(6))
        bound = (6 / (8 * 256 + 256)) ** 0.5
        assert we[:, new].abs().max() <= bound and we[:, new].std() > bound / 4
    assert tuple(ext(torch.randn(1, 8, 32, 32))[-1].shape) == (1, 5, 256)
    # a checkpoint trained on another band order: pretrained_bands says which column is which
    rev = build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path=path, img_size=32,
                        pretrained_bands=list(reversed(DEFAULT_BANDS)))
    assert torch.equal(rev.patch_embed.proj.weight, w.flip(1))


def test_tl_checkpoint_into_variant_without_coordinates(tmp_path: Path) -> None:
    src = _randomised("prithvi_eo_v2_tiny_tl", img_size=32)
    path = _save(_official_state(src), tmp_path / "tl.pt")
    plain = PrithviViT(embed_dim=192, depth=12, num_heads=3, bands=list(DEFAULT_BANDS), img_size=32)
    load_checkpoint_into(plain, CheckpointSource("custom", ckpt_path=path, pretrained_bands=DEFAULT_BANDS))
    assert torch.equal(plain.blocks[11].mlp.fc2.weight, src.blocks[11].mlp.fc2.weight)


def _expect_error(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "prithvi_eo_tiny", **kw: object) -> str:
    path = _save(sd, tmp_path / "bad.pt")
    with pytest.raises(PrithviCheckpointError) as info:
        build_prithvi(name, pretrained=True, ckpt_path=path, img_size=32, **kw)
    assert path in str(info.value)
    return str(info.value)


def test_missing_unexpected_and_misshapen_keys_are_errors(tmp_path: Path) -> None:
    src = _randomised("prithvi_eo_tiny", img_size=32)
    good = _official_state(src)

    missing = {k: v for k, v in good.items() if k != "encoder.blocks.1.mlp.fc1.bias"}
    msg = _expect_error(tmp_path, missing)
    assert "missing encoder keys" in msg and "blocks.1.mlp.fc1.bias" in msg and "nothing was loaded" in msg

    msg = _expect_error(tmp_path, {**good, "encoder.blocks.0.attn.q_bias": torch.zeros(256), "foo": torch.zeros(1)})
    assert "unexpected keys" in msg and "encoder.blocks.0.attn.q_bias" in msg and "foo" in msg

    bad = dict(good)
    bad["encoder.blocks.2.attn.qkv.weight"] = bad["encoder.blocks.2.attn.qkv.weight"][:512]
    msg = _expect_error(tmp_path, bad)
    assert "misshapen keys: encoder.blocks.2.attn.qkv.weight: checkpoint [512, 256] vs model [768, 256]" in msg

    bad = dict(good)
    bad["encoder.patch_embed.proj.weight"] = torch.zeros(256, 6, 1, 14, 14)
    msg = _expect_error(tmp_path, bad)
    assert "patch_embed.proj.weight has shape [256, 6, 1, 14, 14] but the model needs [256, 6, 1, 16, 16]" in msg

    msg = _expect_error(tmp_path, good, pretrained_bands=["RED", "GREEN"])
    assert "has 6 input channels but pretrained_bands lists 2 bands" in msg

    no_scale = {k: v for k, v in _official_state(_randomised("prithvi_eo_v2_tiny_tl", img_size=32)).items()
                if "embed_enc.scale" not in k}
    msg = _expect_error(tmp_path, no_scale, name="prithvi_eo_v2_tiny_tl")
    assert "temporal_embed_enc.scale" in msg and "use the variant without _tl" in msg


def test_a_failed_load_changes_nothing(tmp_path: Path) -> None:
    src = _randomised("prithvi_eo_tiny", img_size=32)
    enc = build_prithvi("prithvi_eo_tiny", img_size=32)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    sd = {k: v for k, v in _official_state(src).items() if k != "encoder.norm.bias"}
    with pytest.raises(PrithviCheckpointError, match=r"norm\.bias"):
        load_checkpoint_into(enc, CheckpointSource("prithvi_eo_tiny", _save(sd, tmp_path / "x.pt"), None, None, DEFAULT_BANDS))
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_unreadable_and_absent_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PrithviCheckpointError, match=r"cannot read checkpoint .*junk\.pt"):
        build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path=str(junk), img_size=32)
    with pytest.raises(PrithviCheckpointError, match=r"non-tensor entries \['epoch'\]"):
        build_prithvi("prithvi_eo_tiny", pretrained=True, img_size=32,
                      ckpt_path=_save({"epoch": 3, "w": torch.zeros(1)}, tmp_path / "mixed.pt"))  # type: ignore[dict-item]
    with pytest.raises(PrithviWeightsUnavailableError, match=r"ckpt_path='/nonexistent/x.pt' .* is not a file"):
        build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path="/nonexistent/x.pt", img_size=32)


def test_meta_build_then_load_pretrained(tmp_path: Path) -> None:
    src = _randomised("prithvi_eo_v2_tiny_tl", img_size=32)
    path = _save(_official_state(src), tmp_path / "official.pt")
    with torch.device("meta"):
        enc = build_prithvi("prithvi_eo_v2_tiny_tl", pretrained=True, ckpt_path=path, img_size=32)
    assert enc.pending_checkpoint is not None and enc.pending_checkpoint.ckpt_path == path
    clone = pickle.loads(pickle.dumps(enc))  # the pending source travels with the module (Ray ships it)
    assert clone.pending_checkpoint == enc.pending_checkpoint
    with pytest.raises(RuntimeError, match=r"still on the meta device; materialise it first"):
        load_pretrained(enc)
    enc.to_empty(device="cpu")
    assert load_pretrained(enc) == [f"<root> <- {path}"]
    _assert_same_weights(src, enc)
    assert torch.equal(enc.pos_embed, src.pos_embed)
    assert load_pretrained(enc) == []  # nothing pending any more
    x = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x)[-1], enc.eval()(x)[-1])


def _fake_hub_cache(home: Path, repo: str, filename: str, payload: Path) -> None:
    """The layout huggingface_hub uses under HF_HOME/hub for a downloaded file."""
    repo_dir = home / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(payload.read_bytes())


def test_pretrained_from_hugging_face_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _randomised("prithvi_eo_v2_tiny_tl", img_size=32)
    meta = BACKBONE_REGISTRY.metadata("prithvi_eo_v2_tiny_tl")
    assert (meta["hf_repo"], meta["hf_filename"]) == ("ibm-nasa-geospatial/Prithvi-EO-2.0-tiny-TL", "Prithvi_EO_V2_tiny_TL.pt")
    _fake_hub_cache(tmp_path / "hf", meta["hf_repo"], meta["hf_filename"], Path(_save(_official_state(src), tmp_path / "o.pt")))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = BACKBONE_REGISTRY.build("prithvi_eo_v2_tiny_tl", pretrained=True, img_size=32)
    _assert_same_weights(src, enc)
    # meta build: the source is the hub file, resolved at load time
    with torch.device("meta"):
        lazy = BACKBONE_REGISTRY.build("prithvi_eo_v2_tiny_tl", pretrained=True, img_size=32)
    lazy.to_empty(device="cpu")
    (loaded,) = load_pretrained(lazy)
    assert loaded.endswith("Prithvi_EO_V2_tiny_TL.pt")
    _assert_same_weights(src, lazy)


def test_offline_without_cache_names_ckpt_path_and_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrithviWeightsUnavailableError) as info:
        BACKBONE_REGISTRY.build("prithvi_eo_v2_300", pretrained=True)
    msg = str(info.value)
    for part in ("ckpt_path", "ibm-nasa-geospatial/Prithvi-EO-2.0-300M", "Prithvi_EO_V2_300M.pt", "HF_HUB_OFFLINE"):
        assert part in msg, part


def _lora(enc: PrithviViT) -> PrithviViT:
    peft_mod = pytest.importorskip("encdec.models.peft")
    cfg = {"method": "LORA", "replace_qkv": "qkv",
           "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear", "mlp.fc2"], "r": 4, "lora_alpha": 4}}
    return peft_mod.get_peft_backbone(cfg, enc)


def test_loads_into_split_qkv_and_lora_wrapped_layers(tmp_path: Path) -> None:
    src = _randomised("prithvi_eo_tiny", img_size=32)
    sd = _official_state(src)
    path = _save(sd, tmp_path / "official.pt")
    source = CheckpointSource("prithvi_eo_tiny", path, None, None, DEFAULT_BANDS)
    enc = _lora(build_prithvi("prithvi_eo_tiny", img_size=32))
    keys = enc.state_dict().keys()
    assert "blocks.0.attn.qkv.q_linear.base_layer.weight" in keys and "blocks.0.mlp.fc2.base_layer.weight" in keys
    load_checkpoint_into(enc, source)
    qkv = src.blocks[3].attn.qkv.weight
    assert torch.equal(enc.blocks[3].attn.qkv.q_linear.base_layer.weight, qkv[:256])
    assert torch.equal(enc.blocks[3].attn.qkv.k_linear.weight, qkv[256:512])
    assert torch.equal(enc.blocks[3].mlp.fc2.base_layer.weight, src.blocks[3].mlp.fc2.weight)
    x = torch.randn(1, 6, 32, 32)
    with torch.no_grad():  # LoRA's B starts at zero: the adapted encoder computes what the source does
        torch.testing.assert_close(enc.eval()(x)[-1], src(x)[-1], rtol=1e-5, atol=1e-5)
    # strictness still holds for base keys
    broken = _save({k: v for k, v in sd.items() if k != "encoder.blocks.2.mlp.fc2.weight"}, tmp_path / "b.pt")
    with pytest.raises(PrithviCheckpointError, match=r"missing encoder keys: blocks\.2\.mlp\.fc2\.base_layer\.weight"):
        load_checkpoint_into(_lora(build_prithvi("prithvi_eo_tiny", img_size=32)), CheckpointSource("t", broken))


def test_meta_lora_to_empty_load_pretrained(tmp_path: Path) -> None:
    src = _randomised("prithvi_eo_tiny", img_size=32)
    path = _save(_official_state(src), tmp_path / "official.pt")
    with torch.device("meta"):
        enc = _lora(build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path=path, img_size=32))
    enc.to_empty(device="cpu")
    assert load_pretrained(enc) == [f"<root> <- {path}"]
    assert torch.equal(enc.blocks[0].attn.qkv.v_linear.base_layer.weight, src.blocks[0].attn.qkv.weight[512:])
    assert torch.equal(enc.patch_embed.proj.weight, src.patch_embed.proj.weight)


_FSDP_SCRIPT = '''
import sys, torch
import torch.distributed as dist
import torch.multiprocessing as mp

def run(rank, world, ckpt, rendezvous):
    # a file rendezvous: a TCP port picked by the test could be taken by another xdist worker before rank 0 binds it
    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard
    from encdec.models.backbones.prithvi import build_prithvi, load_pretrained
    src = torch.load(ckpt, weights_only=True)
    with torch.device("meta"):
        enc = build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path=ckpt, img_size=32)
    for block in enc.blocks:
        fully_shard(block)
    fully_shard(enc)
    enc.to_empty(device="cpu")
    assert load_pretrained(enc) == ["<root> <- " + ckpt]
    for k, v in enc.state_dict().items():
        if k == "pos_embed":  # a buffer (FSDP2 shards parameters only), recomputed for this 32x32 grid
            assert torch.equal(v, enc.pos_embed) and v.shape == (1, 5, 256), k
            continue
        assert type(v).__name__ == "DTensor", k
        assert torch.equal(v.full_tensor(), src["encoder." + k]), k
    qkv = enc.blocks[0].attn.qkv.weight
    assert qkv.to_local().shape[0] == qkv.shape[0] // 2  # really sharded
    assert torch.isfinite(enc(torch.randn(2, 6, 32, 32))[-1]).all()
    # the same with the q/k/v split and LoRA applied on meta before sharding (split keys become DTensors too)
    from encdec.models.peft import get_peft_backbone
    lora = {"method": "LORA", "replace_qkv": "qkv",
            "peft_config_kwargs": {"target_modules": ["qkv.q_linear", "qkv.v_linear"], "r": 4, "lora_alpha": 4}}
    with torch.device("meta"):
        enc = get_peft_backbone(lora, build_prithvi("prithvi_eo_tiny", pretrained=True, ckpt_path=ckpt, img_size=32))
    for block in enc.blocks:
        fully_shard(block)
    fully_shard(enc)
    enc.to_empty(device="cpu")
    assert len(load_pretrained(enc)) == 1
    fused = src["encoder.blocks.3.attn.qkv.weight"]
    assert torch.equal(enc.blocks[3].attn.qkv.q_linear.base_layer.weight.full_tensor(), fused[:256])
    assert torch.equal(enc.blocks[3].attn.qkv.k_linear.weight.full_tensor(), fused[256:512])
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
    print("FSDP2 load OK")
'''


@pytest.mark.distributed
def test_load_pretrained_into_fsdp2_sharded_encoder(tmp_path: Path) -> None:
    """The engine's order: meta build (-> q/k/v split + LoRA) -> fully_shard per block and root -> to_empty ->
    load, on 2 gloo ranks."""
    import subprocess
    import sys

    src = _randomised("prithvi_eo_tiny", img_size=32)
    ckpt = _save(_official_state(src), tmp_path / "official.pt")
    script = tmp_path / "fsdp_load.py"
    script.write_text(_FSDP_SCRIPT)
    rendezvous = str(tmp_path / "rendezvous")
    proc = subprocess.run([sys.executable, str(script), ckpt, rendezvous], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "FSDP2 load OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("on_meta", [False, True])
def test_coords_encoding_added_to_a_variant_pretrained_without_it(tmp_path: Path, on_meta: bool) -> None:
    """The official burn-scars config asks prithvi_eo_v2_300 (no coordinate encoders in its file) for
    coords_encoding [time, location]: TerraTorch builds fixed-scale (1.0) encoders and loads the file."""
    src = _randomised("prithvi_eo_tiny", img_size=32)
    path = _save(_official_state(src), tmp_path / "official.pt")
    kwargs: dict[str, Any] = {"pretrained": True, "ckpt_path": path, "img_size": 32,
                              "coords_encoding": ["time", "location"]}
    if on_meta:
        with torch.device("meta"):
            enc = build_prithvi("prithvi_eo_tiny", **kwargs)
        enc.to_empty(device="cpu")
        assert load_pretrained(enc) == ["<root> <- " + path]
    else:
        enc = build_prithvi("prithvi_eo_tiny", **kwargs)
    assert enc.temporal_encoding and enc.location_encoding and enc.coords_added
    for m in (enc.temporal_embed_enc, enc.location_embed_enc):
        assert torch.equal(m.scale, torch.ones(1)) and not any(p is m.scale for p in enc.parameters())
    assert torch.equal(enc.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    learned = build_prithvi("prithvi_eo_tiny", img_size=32, coords_encoding=["time"], coords_scale_learn=True)
    assert isinstance(learned.temporal_embed_enc.scale, nn.Parameter) and not learned.location_encoding
