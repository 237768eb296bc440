"""The checks ``encdec-launch recipe`` runs beyond the schema: everything that needs no model build.

Registry names (backbone, necks, decoders), the ``backbone_*`` argument names against the registered backbone's
signature (read, not called), and band/channel counts. What only ``--dry-run``/``plan`` does is listed in
:data:`DRY_RUN_ONLY`, so the check command can say so instead of a bare "ok".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from encdec.launcher.recipe.errors import RecipeIssue

if TYPE_CHECKING:
    from encdec.launcher.recipe.schema import Recipe

__all__ = ["DRY_RUN_ONLY", "STATIC_CHECKS", "static_checks"]

STATIC_CHECKS = "schema, cross-field rules, registry names, backbone_* argument names, band/channel counts"
DRY_RUN_ONLY = ("building the model on the meta device, a dummy batch through it (output shape), memory per "
                "strategy, the data paths and a sample of tiles")

# arguments the factory itself takes out of the backbone's before building it
_FACTORY_BACKBONE_ARGS = ("padding",)


def _backbone_args(recipe: Recipe) -> dict[tuple[str | int, ...], str]:
    """``{recipe path: argument name}`` of every backbone argument (``backbone_x`` or ``backbone_kwargs.x``)."""
    m = recipe.model
    out: dict[tuple[str | int, ...], str] = {}
    for key in m.model_extra or {}:
        if key.startswith("backbone_") and key[len("backbone_"):] not in _FACTORY_BACKBONE_ARGS:
            out[("model", key)] = key[len("backbone_"):]
    for key in m.backbone_kwargs or {}:
        if key not in _FACTORY_BACKBONE_ARGS:
            out[("model", "backbone_kwargs", key)] = key
    return out


def static_checks(recipe: Recipe) -> list[RecipeIssue]:
    """Every problem found without building the model (empty when none)."""
    from encdec.launcher.preflight.plan import check_names
    from encdec.models.backbone_args import accepted_backbone_args, not_implemented_note

    issues = check_names(recipe)
    m = recipe.model
    if not any(i.path == ("model", "backbone") for i in issues):
        accepted = accepted_backbone_args(m.backbone) or []  # None (cannot tell): nothing is refused
        for path, arg in _backbone_args(recipe).items() if accepted else ():
            if arg in accepted:
                continue
            from encdec.launcher.recipe.errors import did_you_mean

            hint = did_you_mean(arg, accepted)
            prefix = "backbone_" if len(path) == 2 else ""
            takes = (f"It takes: {', '.join(prefix + a for a in accepted)}" if len(accepted) <= 20 else
                     f"It takes {len(accepted)} arguments, e.g. {', '.join(prefix + a for a in accepted[:8])}")
            issues.append(RecipeIssue(path, f"backbone '{m.backbone}' does not take '{arg}'"
                                      f"{not_implemented_note(m.backbone, [arg])}", has_value=False,
                                      fix=(f"{hint.strip()} " if hint else "") + takes))
    bands = len(recipe.data.bands)
    for key in ("in_chans", "in_channels"):
        chans = m.backbone_arg(key)
        if isinstance(chans, int) and not isinstance(chans, bool) and chans != bands and recipe.data.num_frames == 1:
            issues.append(RecipeIssue(("model", f"backbone_{key}"), f"is {chans} but data.bands has {bands} bands "
                                      "(the model's first layer would not fit the input)", chans,
                                      fix=f"set it to {bands}, or leave it out (it follows data.bands)"))
    return issues
