"""CLI bodies ``encdec-launch make-data`` and ``encdec-launch stats`` (each with its own argparse)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from encdec.config import DataSource
from encdec.data.config import DataConfigError


def _bands(text: str) -> list[int | str]:
    return [int(b) if b.strip().isdigit() else b.strip() for b in text.split(",") if b.strip()]


_TILE_FILE = re.compile(r"tile_\d{5}_(img|mask)\.tif|manifest\.csv")


def _make_data_target(out: Path, overwrite: bool) -> str | None:
    """Why ``out`` cannot receive a new tile set (None when it can). Mixing a new set into an old one would give a
    folder of tiles of two sizes or seeds; ``--overwrite`` first removes what an earlier make-data wrote."""
    if out.exists() and not out.is_dir():
        return f"{out} is a file; give a folder (OUT/train and OUT/val are created in it)"
    for sub in (out / "train", out / "val"):
        if sub.exists() and not sub.is_dir():
            return f"{sub} is a file; give another OUT or remove it"
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not overwrite:
        return (f"{out} is not empty; the new tiles would mix with what is there. Give an empty or new folder, "
                "or --overwrite to replace a tile set make-data wrote there")
    others = [p for sub in (out / "train", out / "val") if sub.is_dir() for p in sub.iterdir()
              if not _TILE_FILE.fullmatch(p.name)]
    if others:
        return (f"--overwrite removes only make-data's own files, but {others[0].parent} also holds other files "
                f"(e.g. {others[0].name}); give an empty or new folder")
    for sub in (out / "train", out / "val"):
        for p in sub.glob("*") if sub.is_dir() else ():
            p.unlink()
    return None


def make_data(argv: list[str]) -> int:
    """``make-data OUT --tiles N``: write a synthetic HLS-like tile set to OUT/train and OUT/val.

    Returns:
        Process exit code.
    """
    p = argparse.ArgumentParser(prog="encdec-launch make-data",
                                description="Write a realistic synthetic HLS-like tile set (train + held-out val).")
    p.add_argument("out", type=Path, help="output folder (OUT/train and OUT/val are created)")
    p.add_argument("--tiles", type=int, default=64, help="train tiles (default 64)")
    p.add_argument("--val-tiles", type=int, default=None, help="held-out val tiles (default tiles/4, at least 1)")
    p.add_argument("--img-size", type=int, default=224, help="tile side in pixels (default 224)")
    p.add_argument("--num-frames", type=int, default=1, help="frames per tile, stacked as band groups")
    p.add_argument("--task", choices=["flood", "landcover"], default="flood", help="mask kind (default flood)")
    p.add_argument("--seed", type=int, default=0, help="seed (val uses seed + 1, so scenes are disjoint)")
    p.add_argument("--no-cog", action="store_true", help="plain tiled GeoTIFF instead of COG")
    p.add_argument("--manifest", action="store_true", help="also write manifest.csv (dates, centre lat/lon)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a tile set make-data wrote before in OUT (its tile_*/manifest.csv files only)")
    args = p.parse_args(argv)
    from encdec.data.synthetic import write_tiles

    if (problem := _make_data_target(args.out, args.overwrite)) is not None:
        print(f"make-data: {problem}", file=sys.stderr)
        return 2
    val_tiles = args.val_tiles if args.val_tiles is not None else max(1, args.tiles // 4)
    start = time.perf_counter()
    common = {"img_size": args.img_size, "task": args.task, "num_frames": args.num_frames,
              "cog": False if args.no_cog else None, "manifest": args.manifest}
    try:
        train = write_tiles(args.out / "train", args.tiles, seed=args.seed, **common)
        val = write_tiles(args.out / "val", val_tiles, seed=args.seed + 1, **common)
    except ValueError as e:
        print(f"make-data: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.tiles} train tiles to {train} and {val_tiles} val tiles to {val} "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"recipe:\n  data:\n    train: {{tiles: {train}}}\n    val: {{tiles: {val}}}\n    img_size: {args.img_size}")
    return 0


def stats(argv: list[str]) -> int:
    """``stats TILES``: per-band means/stds and class frequencies over a sample, printed (or written) as YAML.

    Returns:
        Process exit code.
    """
    p = argparse.ArgumentParser(prog="encdec-launch stats",
                                description="Compute per-band means/stds (and class frequencies where there are "
                                            "masks) for a recipe.")
    p.add_argument("tiles", help="tile folder (searched recursively, e.g. the folder make-data wrote), glob or file, "
                                 "or a CSV/Parquet manifest")
    p.add_argument("--bands", default=None,
                   help="comma-separated band names or 0-based indexes (default: every band of the files, by name "
                        "when they are named, else by index)")
    p.add_argument("--sample", type=int, default=500, help="tiles sampled at random (default 500; 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--image-suffix", default=None,
                   help="image file ending (default: _img.tif when there are such files, else .tif/.tiff)")
    p.add_argument("--mask-suffix", default="_mask.tif", help="mask file ending (default _mask.tif; images without "
                                                              "a mask count for the image statistics)")
    p.add_argument("--split", default=None, help="manifest split to use (default: all rows)")
    p.add_argument("--out", type=Path, default=None, help="write the YAML here instead of stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    import yaml

    from encdec.data import stats as st
    from encdec.data.sources import list_samples

    try:
        if args.tiles.lower().endswith((".csv", ".parquet", ".pq")):
            spec = DataSource.model_validate({"manifest": args.tiles, "split": args.split})
            try:
                samples = list_samples(spec, img_size=0, where="stats", split=None)
            except DataConfigError as e:  # in the command's words: its argument and flags, not recipe keys
                raise st.StatsError(str(e).replace("stats.manifest", "TILES").replace("stats.split", "--split")) from e
        else:
            samples = st.find_samples(args.tiles, args.image_suffix, args.mask_suffix)
        chosen = st.sample_tiles(samples, args.sample or None, args.seed)
        bands, _ = st.choose_bands(chosen, _bands(args.bands) if args.bands else None)
    except st.StatsError as e:
        print(f"stats: {e}", file=sys.stderr)
        return 2
    result = st.compute(chosen, bands, progress=not args.no_progress and sys.stderr.isatty())
    for what, items in (("unreadable, skipped", result.skipped),
                        ("mask grid differs from its image (training rejects the pair; image counted, mask not)",
                         result.mask_mismatch)):
        if items:
            more = f"; and {len(items) - 10} more" if len(items) > 10 else ""
            print(f"stats: warning: {len(items)} file(s) {what}: " + "; ".join(items[:10]) + more, file=sys.stderr)
    if not result.tiles:
        print(f"stats: none of {len(chosen)} tiles could be read", file=sys.stderr)
        return 1
    masks = sum(s.mask is not None for s in chosen)
    text = (f"# encdec-launch stats over {result.tiles} of {len(samples)} tiles"
            f"{f' ({len(result.skipped)} unreadable skipped)' if result.skipped else ''}"
            f"{'' if masks else '; no masks found: image statistics only'}\n")
    text += yaml.safe_dump(result.recipe(), sort_keys=False, default_flow_style=None)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0
