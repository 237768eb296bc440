"""``run.init_from`` / ``--init-from``: a TerraTorch fine-tuned checkpoint checked against the recipe's model before
any cluster starts.

The workers load it (``encdec.train.loop.train(init_from=...)``) after the build, the pretrained backbone weights
and PEFT, before sharding; a checkpoint that does not fit would fail there, on every worker, after the cluster
started, the tiles were written and the run directory was made. So the launcher reads it first, builds the model
on the meta device exactly as the workers do (real PEFT wrapping: the key names must be the workers' names), and
loads the checkpoint into it: the same key mapping and checks as on the workers, no weights allocated.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from encdec.launcher.recipe.errors import LaunchError

if TYPE_CHECKING:
    from encdec.launcher.recipe.schema import Recipe

__all__ = ["check_init_from"]

_WHAT = "run.init_from / --init-from"


def check_init_from(recipe: Recipe) -> None:
    """Fail early, naming the file and the fix, when ``run.init_from`` cannot initialise this recipe's model.

    Raises:
        LaunchError: no such file; a file that is not a checkpoint (or has no model weights); a checkpoint whose
            keys or shapes do not fit the model built from the recipe (the first mismatching keys named).
    """
    if not recipe.run.init_from:
        return
    path = Path(recipe.run.init_from)
    if not path.is_file():
        raise LaunchError(f"{_WHAT} {path}: no such file (give a TerraTorch .ckpt, or a state-dict file)")
    from encdec.models.terratorch_ckpt import CheckpointMismatch, load_terratorch_weights, read_checkpoint

    try:
        state = read_checkpoint(path)
    except Exception as err:  # any reader failure is the same problem for the user: this file is not usable
        raise LaunchError(f"{_WHAT} {path}: cannot be read as a checkpoint ({type(err).__name__}: {err}); give a "
                          "TerraTorch Lightning .ckpt (weights under 'state_dict', keys 'model.*') or a file "
                          "saved with torch.save(model.state_dict())") from err
    net = _meta_model(recipe)
    # meta copies: the check compares names and shapes; nothing is copied into the meta parameters
    meta_state = {k: v.to("meta") if hasattr(v, "to") else v for k, v in state.items()}
    try:
        load_terratorch_weights(net, meta_state, strict=True)
    except CheckpointMismatch as err:
        raise LaunchError(f"{_WHAT} {path} does not fit the recipe's model ({recipe.model.backbone} + "
                          f"{recipe.model.decoder}, task {recipe.task}):\n{err}\nfix: start from a checkpoint of "
                          "this same model_args block (backbone, necks, decoder, num_classes, peft_config), or "
                          "change the recipe's model section to the one the checkpoint was trained with") from err


def _meta_model(recipe: Recipe) -> Any:
    """The recipe's model on the meta device, PEFT-wrapped as on the workers (no weights read or allocated)."""
    from encdec.train.build import build_run_model

    return build_run_model(recipe.task, recipe.model.without_pretrained(), device="meta")
