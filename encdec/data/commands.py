"""CLI bodies ``encdec-launch make-data`` and ``encdec-launch stats`` (each with its own argparse)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from encdec.config import HLS_BANDS, DataSource
from encdec.data.config import DataConfigError


def _bands(text: str) -> list[int | str]:
    return [int(b) if b.strip().isdigit() else b.strip() for b in text.split(",") if b.strip()]


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
    args = p.parse_args(argv)
    from encdec.data.synthetic import write_tiles

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
                                description="Compute per-band means/stds and class frequencies for a recipe.")
    p.add_argument("tiles", help="tile folder or glob, or a CSV/Parquet manifest")
    p.add_argument("--bands", default=",".join(HLS_BANDS),
                   help="comma-separated band names or 0-based indexes (default: the HLS bands)")
    p.add_argument("--sample", type=int, default=500, help="tiles sampled at random (default 500; 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--image-suffix", default="_img.tif", help="image file ending (default _img.tif)")
    p.add_argument("--mask-suffix", default="_mask.tif", help="mask file ending (default _mask.tif)")
    p.add_argument("--split", default=None, help="manifest split to use (default: all rows)")
    p.add_argument("--out", type=Path, default=None, help="write the YAML here instead of stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    import yaml

    from encdec.data import stats as st
    from encdec.data.sources import list_samples

    is_manifest = args.tiles.lower().endswith((".csv", ".parquet", ".pq"))
    spec = DataSource.model_validate({"tiles": None if is_manifest else args.tiles,
                                      "manifest": args.tiles if is_manifest else None,
                                      "image_suffix": args.image_suffix, "mask_suffix": args.mask_suffix,
                                      "split": args.split})
    try:
        samples = list_samples(spec, img_size=0, where="stats", split=None)
    except DataConfigError as e:
        print(f"stats: {e}", file=sys.stderr)
        return 2
    chosen = st.sample_tiles(samples, args.sample or None, args.seed)
    result = st.compute(chosen, _bands(args.bands), progress=not args.no_progress and sys.stderr.isatty())
    if not result.tiles:
        print(f"stats: none of {len(chosen)} tiles could be read; first errors: {result.skipped[:3]}", file=sys.stderr)
        return 1
    text = (f"# encdec-launch stats over {result.tiles} of {len(samples)} tiles"
            f"{f' ({len(result.skipped)} unreadable skipped)' if result.skipped else ''}\n")
    text += yaml.safe_dump(result.recipe(), sort_keys=False, default_flow_style=None)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0
