"""The Prithvi-EO-2.0 ViT encoder as a plain module (no instance-patched methods: it pickles, deep-copies and
builds on the meta device).

Forward: ``[B, C, T, H, W]`` (or ``[B, C, H, W]`` when ``num_frames == 1``) -> one ``[B, 1 + N, D]`` tensor per
selected block, the last one after the final LayerNorm.

``pos_embed`` is a persistent buffer under its official name, so a state dict from here loads ``strict=True`` into
TerraTorch's Prithvi and the official loader. It is a fixed function of the grid: it is recomputed whenever the
module's tensors are re-created (``to_empty`` after a meta build, ``.to(dtype)``). A state dict that holds it for this grid
loads it as TerraTorch does; one that lacks it (round-1 run checkpoints, adapter-only files) or holds one for
another grid (a checkpoint trained at another ``img_size``) still loads, with this grid's table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from encdec.config.checks import check_int
from encdec.models.backbones.prithvi_bands import Band, band_label
from encdec.models.backbones.prithvi_layers import Block, LocationEncoder, PatchEmbed3D, TemporalEncoder
from encdec.models.backbones.prithvi_pos import interpolate_pos_embed, sincos_3d_pos_embed

__all__ = ["PrithviViT"]

LOG = logging.getLogger(__name__)

COORDS = ("time", "location")


def _pair(value: int | Sequence[int], field: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{field} must be an int or (height, width), got {value!r}")


class PrithviViT(nn.Module):
    """Prithvi-EO-2.0 encoder (3D patch embedding, cls token, fixed 3D sin-cos positions, ViT blocks).

    Args:
        embed_dim: token width D (a multiple of 16 and of ``num_heads``).
        depth: number of transformer blocks.
        num_heads: attention heads.
        patch_size: (t, h, w) tubelet; an int means (1, p, p).
        bands: the model's input bands, in channel order (already normalised, see ``prithvi_bands``).
        img_size: (H, W) the position embedding is built for; other sizes are interpolated at run time.
        num_frames: frames T per sample.
        mlp_ratio: MLP hidden width / D.
        coords_encoding: subset of ``("time", "location")``: coordinate encodings.
        coords_scale_learn: their scale is learnable (starts at 0.1; the ``_tl`` variants) or a fixed 1.0.
        drop_path_rate: stochastic-depth rate, the same for every block (as in TerraTorch's ``drop_path``).
        out_indices: which block outputs forward returns (default: all, in order); negative indices allowed.
        variant: registry name, informative only.
    """

    pos_embed: Tensor  # persistent buffer [1, 1 + t*h*w, D], registered in __init__
    recomputed_buffers = ("pos_embed",)  # see encdec.models.model.recomputed_state_keys

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int | Sequence[int] = (1, 16, 16),
        bands: Sequence[Band],
        img_size: int | Sequence[int] = 224,
        num_frames: int = 1,
        mlp_ratio: float = 4.0,
        coords_encoding: Sequence[str] = (),
        coords_scale_learn: bool = True,
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] | None = None,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(patch_size, int):
            patch_size = (1, patch_size, patch_size)
        if len(patch_size) != 3 or not all(isinstance(p, int) and p > 0 for p in patch_size):
            raise ValueError(f"patch_size must be (t, h, w) positive ints or an int, got {patch_size!r}")
        check_int(num_frames, "num_frames", fix="the time steps per sample, e.g. 1 for single-date images")
        pt, ph, pw = (int(p) for p in patch_size)
        if num_frames % pt:
            raise ValueError(f"num_frames={num_frames} must be a multiple of the tubelet size {pt} (patch_size[0])")
        self.img_size = _pair(img_size, "img_size")
        if self.img_size[0] < ph or self.img_size[1] < pw:
            raise ValueError(f"img_size={self.img_size} is smaller than the patch size {(ph, pw)}")
        unknown = [c for c in coords_encoding if c not in COORDS]
        if unknown:
            raise ValueError(f"coords_encoding {unknown} not understood; allowed: {list(COORDS)}")
        if "time" in coords_encoding and pt != 1:
            raise ValueError(f"temporal coordinates need a tubelet of 1 frame (patch_size[0] == 1), got {pt}")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")

        self.variant = variant
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size: tuple[int, int, int] = (pt, ph, pw)
        self.num_frames = num_frames
        self.bands: list[Band] = list(bands)
        self.in_chans = len(self.bands)
        self.grid: tuple[int, int, int] = (num_frames // pt, self.img_size[0] // ph, self.img_size[1] // pw)
        self.temporal_encoding = "time" in coords_encoding
        self.location_encoding = "location" in coords_encoding
        self.out_indices = self._resolve_out_indices(out_indices, depth)
        self.out_channels: list[int] = [embed_dim * self.grid[0]] * len(self.out_indices)
        # A checkpoint to load once the tensors are real (set by the builder for meta builds).
        self.pending_checkpoint: Any = None
        # Coordinate encodings a config added to a variant pretrained without them (set by the builder): its
        # checkpoint lacks their scales, which then keep their initial value.
        self.coords_added = False

        self.patch_embed = PatchEmbed3D(self.in_chans, embed_dim, self.patch_size)
        if self.temporal_encoding:
            self.temporal_embed_enc = TemporalEncoder(embed_dim, coords_scale_learn)
        if self.location_encoding:
            self.location_embed_enc = LocationEncoder(embed_dim, coords_scale_learn)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", torch.zeros(1, 1 + self.grid[0] * self.grid[1] * self.grid[2], embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, float(drop_path_rate)) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        if not self.is_meta:
            self.init_weights()

    # -- construction helpers ------------------------------------------------------------------------------
    @staticmethod
    def _resolve_out_indices(out_indices: Sequence[int] | None, depth: int) -> list[int]:
        if out_indices is None:
            return list(range(depth))
        if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence) or not out_indices:
            raise ValueError(f"out_indices must be a non-empty list of block indices, got {out_indices!r}")
        resolved = []
        for i in out_indices:
            check_int(i, f"out_indices entry {i!r}", minimum=-depth, maximum=depth - 1,
                      fix=f"a block index of this {depth}-block encoder (negative counts from the last)")
            resolved.append(i % depth)
        return resolved

    @property
    def is_meta(self) -> bool:
        """True while the parameters are shape-only (built under ``torch.device('meta')``)."""
        return self.cls_token.device.type == "meta"

    def reset_pos_embed(self) -> None:
        """Recompute the fixed position embedding in place (no-op on the meta device)."""
        buf = self.pos_embed
        if buf.device.type == "meta":
            return
        with torch.no_grad():
            buf.copy_(sincos_3d_pos_embed(self.embed_dim, self.grid, device=buf.device, dtype=torch.float32))

    def init_weights(self) -> None:
        """Random initialisation of a pretraining run (xavier-uniform linears and patch embedding, N(0, .02) cls,
        unit LayerNorms, coordinate scales 0.1) and the position embedding. Call after ``to_empty`` when no
        checkpoint is loaded."""
        with torch.no_grad():
            self.reset_pos_embed()
            self.patch_embed.proj.reset_parameters()  # the bias keeps Conv3d's default init, as in the reference
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, (TemporalEncoder, LocationEncoder)):
                    m.scale.fill_(0.1 if m.trainable_scale else 1.0)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PrithviViT:  # type: ignore[override]
        # ``to_empty`` (and ``.to``/``.half``) go through here; a re-created pos_embed holds garbage or a rounded
        # copy, so it is rebuilt from its definition afterwards.
        super()._apply(fn, recurse)
        self.reset_pos_embed()
        return self

    def _load_from_state_dict(  # type: ignore[override]
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # ``state_dict`` is load_state_dict's own copy. Like TerraTorch, a stored table of this grid's shape is loaded
        # (official files hold the same sin-cos values); a missing one (round-1 run checkpoints, adapter-only files)
        # or one built for another grid (a file trained at another img_size) is replaced by this grid's table.
        key = prefix + "pos_embed"
        stored = state_dict.get(key)
        if not (isinstance(stored, Tensor) and stored.shape == self.pos_embed.shape):
            if stored is not None:
                LOG.info("%s has shape %s; recomputed for this encoder's grid %s", key,
                         tuple(getattr(stored, "shape", ())), self.grid)
            device = stored.device if isinstance(stored, Tensor) and not stored.is_meta else self.pos_embed.device
            fresh = sincos_3d_pos_embed(self.embed_dim, self.grid, device=device, dtype=torch.float32)
            state_dict[key] = fresh.to(self.pos_embed.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def prepare_features_for_image_model(
        self, features: list[Tensor], image_size: tuple[int, int] | None = None
    ) -> list[Tensor]:
        """Tokens -> maps, as TerraTorch's ``PrithviViT.prepare_features_for_image_model`` (used by the factory's
        models when no neck is given): drop the cls token and fold time into channels,
        ``[B, 1 + t*h*w, D] -> [B, t*D, h, w]``.

        TerraTorch assumes a square grid with the configured number of frames; with ``image_size`` (the padded
        input's H, W, which the factory's models pass) the real grid is used, so non-square inputs work too.
        """
        _, ph, pw = self.patch_size
        out = []
        for i, x in enumerate(features):
            if x.dim() != 3:
                raise ValueError(f"feature {i} has shape {tuple(x.shape)}; expected Prithvi tokens [B, 1 + N, D]")
            tokens = x[:, 1:]
            b, n, d = tokens.shape
            if image_size is not None:
                gh, gw = int(image_size[0]) // ph, int(image_size[1]) // pw
                t = n // max(gh * gw, 1)
            else:
                t = self.grid[0]
                gh = gw = math.isqrt(n // t)
            if t < 1 or t * gh * gw != n:
                raise ValueError(
                    f"cannot arrange {n} tokens into a (t, h, w) grid (image_size={image_size}, patch_size="
                    f"{self.patch_size}); pass the image size the encoder saw"
                )
            out.append(tokens.reshape(b, t, gh, gw, d).permute(0, 1, 4, 2, 3).reshape(b, t * d, gh, gw))
        return out

    # -- forward ---------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            if self.num_frames != 1:
                raise ValueError(
                    f"input of shape {tuple(x.shape)} has no time axis but this encoder has num_frames="
                    f"{self.num_frames}; pass [B, C, T, H, W]"
                )
            x = x.unsqueeze(2)
        if x.dim() != 5:
            raise ValueError(f"input must be [B, C, T, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"input has {x.shape[1]} channels but the encoder was built for {self.in_chans} bands "
                f"{[band_label(b) for b in self.bands]}; pass bands=[...] matching the data"
            )
        t, h, w = x.shape[-3:]
        pt, ph, pw = self.patch_size
        if t % pt or h % ph or w % pw or t < pt or h < ph or w < pw:
            raise ValueError(
                f"input (T, H, W) = {(t, h, w)} is not a multiple of the patch size {self.patch_size}; pad it "
                "(the factory's models pad H/W to the patch size themselves)"
            )
        return x

    def forward(
        self,
        x: Tensor,
        temporal_coords: Tensor | None = None,
        location_coords: Tensor | None = None,
    ) -> list[Tensor]:
        """Encode ``x``; coordinates are used only by ``_tl`` variants and ignored otherwise.

        Args:
            x: ``[B, C, T, H, W]`` or ``[B, C, H, W]`` (num_frames == 1).
            temporal_coords: ``[B, T, 2]`` (year, day of year).
            location_coords: ``[B, 2]`` (latitude, longitude).

        Returns:
            One ``[B, 1 + N, D]`` tensor per entry of ``out_indices``.
        """
        x = self._check_input(x)
        b, _, t, h, w = x.shape
        pt, ph, pw = self.patch_size
        grid = (t // pt, h // ph, w // pw)
        tokens = self.patch_embed(x)
        pos = interpolate_pos_embed(self.pos_embed, self.grid, grid).to(tokens.dtype)
        tokens = tokens + pos[:, 1:]
        if self.temporal_encoding and temporal_coords is not None:
            if temporal_coords.shape != (b, t, 2):
                raise ValueError(
                    f"temporal_coords must be [B, T, 2] = {[b, t, 2]} (year, day of year per frame), "
                    f"got {list(temporal_coords.shape)}"
                )
            coords = temporal_coords if temporal_coords.is_floating_point() else temporal_coords.float()
            tokens = tokens + self.temporal_embed_enc(coords, tokens.shape[1] // t).to(tokens.dtype)
        if self.location_encoding and location_coords is not None:
            if location_coords.shape != (b, 2):
                raise ValueError(
                    f"location_coords must be [B, 2] = {[b, 2]} (latitude, longitude), got {list(location_coords.shape)}"
                )
            coords = location_coords if location_coords.is_floating_point() else location_coords.float()
            tokens = tokens + self.location_embed_enc(coords).to(tokens.dtype)
        cls = (self.cls_token + pos[:, :1]).expand(b, -1, -1)
        hidden = torch.cat([cls, tokens], dim=1)

        outs: list[Tensor] = []
        for block in self.blocks:
            hidden = block(hidden)
            outs.append(hidden)
        outs[-1] = self.norm(hidden)
        return [outs[i] for i in self.out_indices]

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, bands={len(self.bands)}, num_frames={self.num_frames}, "
            f"img_size={self.img_size}, patch_size={self.patch_size}, coords="
            f"{[c for c, on in zip(COORDS, (self.temporal_encoding, self.location_encoding)) if on]}"
        )
