"""A small PNG of a scene's output (classes coloured with a legend, or a value colour bar), to look instead of
opening a GIS. Read from the COG's overviews: never the full-resolution scene."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from encdec.predict.outputs import OutputSpec

__all__ = ["write_quicklook"]


def write_quicklook(cog: Path, png: Path, spec: OutputSpec, *, title: str, max_side: int = 768) -> Path:
    """Write ``png`` (atomically) from the single-band output ``cog``; returns ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from rasterio.enums import Resampling

    with rasterio.open(cog) as src:
        scale = max(1.0, max(src.height, src.width) / max_side)
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        data = src.read(1, out_shape=shape, resampling=Resampling.nearest)
        tagged = json.loads(src.tags().get("class_names", "[]"))  # what assemble_scene wrote: the output's names
    fig, ax = plt.subplots(figsize=(7, 7 * shape[0] / shape[1] + 0.6), dpi=100)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    if spec.task == "segmentation":
        k = max(len(tagged), int(data[data != 255].max(initial=0)) + 1)
        colours = plt.get_cmap("tab20" if k > 10 else "tab10")(np.arange(k) % (20 if k > 10 else 10))
        img = np.ma.masked_equal(data, 255)
        ax.imshow(img, cmap=ListedColormap(colours), vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
        names = spec.names(k)  # the names assemble_scene tagged (the same spec), and class i beyond them
        handles = [Patch(color=colours[i], label=f"{i}: {names[i]}") for i in range(k)]
        handles.append(Patch(facecolor="white", edgecolor="grey", label="nodata"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    tmp = png.with_name(f".{png.name}.part.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(png)
    return png
