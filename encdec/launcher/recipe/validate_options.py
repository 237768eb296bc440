"""Cross-field rules for the engine's finer options: keys that only mean something with another key's value.

The engine ignores an option that does not apply (``momentum`` under AdamW, ``huber_delta`` with ``ce``,
``reshard_after_forward`` without FSDP) and silently never keeps a best checkpoint for a metric it does not
report; a recipe that sets one of these most likely meant something else, so it is an error here, with the fix.
Only values that differ from the default are judged: defaults never trip a rule, so a run directory's resolved
recipe (every key written out) validates as its source did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from encdec.launcher.recipe.errors import RecipeIssue, did_you_mean

if TYPE_CHECKING:
    from encdec.launcher.recipe.schema import Recipe

__all__ = ["option_checks", "val_metric_names"]

# which loss names read each option (encdec.train.losses)
_LOSS_OPTION_USERS = {
    "dice_weight": ("ce_dice",),
    "dice_smooth": ("dice", "ce_dice"),
    "huber_delta": ("huber",),
}
_ADAMW_ONLY = ("betas", "eps", "fused")
_SGD_ONLY = ("momentum", "nesterov")


def val_metric_names(task: str, num_classes: int | None) -> list[str]:
    """The validation metrics the engine reports for a task (``encdec.train.metrics``), ``val/`` prefixed."""
    if task in ("segmentation", "classification"):
        names = ["mIoU", "accuracy", "mAcc"] + [f"IoU_{i}" for i in range(num_classes or 0)]
    else:
        names = ["rmse", "mae"]
    return ["val/loss"] + [f"val/{n}" for n in names]


def _changed(section: Any, key: str) -> bool:
    """Whether ``section.key`` differs from the field's default."""
    info = type(section).model_fields[key]
    return bool(getattr(section, key) != info.get_default(call_default_factory=True))


def _metric_hint(value: str, names: list[str]) -> str:
    """A did-you-mean that forgives case and a missing ``val/`` (``miou`` -> ``val/mIoU``)."""
    import difflib

    short = {n.lower().removeprefix("val/"): n for n in names}
    close = difflib.get_close_matches(value.lower().removeprefix("val/"), list(short), n=1, cutoff=0.6)
    return f" Did you mean {short[close[0]]!r}?" if close else ""


def option_checks(recipe: Recipe) -> list[RecipeIssue]:
    """Every violation of the option rules (see the module docstring)."""
    return _loss_checks(recipe) + _optim_checks(recipe) + _train_checks(recipe)


def _loss_checks(recipe: Recipe) -> list[RecipeIssue]:
    issues: list[RecipeIssue] = []
    loss = recipe.loss
    default = "ce" if recipe.task in ("segmentation", "classification") else "mse"
    name = loss.name or default
    for key, users in _LOSS_OPTION_USERS.items():
        value = getattr(loss, key)
        if value is not None and name not in users:
            issues.append(RecipeIssue(("loss", key), f"is only read by loss {' / '.join(users)}, and the loss is "
                                      f"'{name}'", value,
                                      fix=f"remove loss.{key}, or set loss.name to {' or '.join(users)}"))
    if loss.aux_weights:
        heads = [a.name for a in recipe.model.aux_decoders or []]
        for head, weight in loss.aux_weights.items():
            if head not in heads:
                known = f"the auxiliary heads are {', '.join(heads)}." if heads else "the model has no aux_decoders."
                issues.append(RecipeIssue(("loss", "aux_weights", head), "names no auxiliary head", weight,
                                          fix=f"use a name from model.aux_decoders[].name: {known}"
                                          f"{did_you_mean(head, heads)}"))
            elif weight < 0:
                issues.append(RecipeIssue(("loss", "aux_weights", head), "must be >= 0", weight,
                                          fix="give a non-negative weight (0 turns that head's loss off)"))
    return issues


def _optim_checks(recipe: Recipe) -> list[RecipeIssue]:
    issues: list[RecipeIssue] = []
    o = recipe.optim
    other = _SGD_ONLY if o.name == "adamw" else _ADAMW_ONLY
    for key in other:
        if _changed(o, key):
            owner = "SGD" if key in _SGD_ONLY else "AdamW"
            issues.append(RecipeIssue(("optim", key), f"is an {owner} option but optim.name is '{o.name}'",
                                      getattr(o, key), fix=f"remove optim.{key}, or set optim.name: "
                                      f"{'sgd' if owner == 'SGD' else 'adamw'}"))
    if o.name == "sgd" and o.nesterov and o.momentum == 0:
        issues.append(RecipeIssue(("optim", "nesterov"), "needs momentum > 0", True,
                                  fix="set optim.momentum (e.g. 0.9) or nesterov: false"))
    if o.min_lr > o.lr:
        issues.append(RecipeIssue(("optim", "min_lr"), f"is above optim.lr ({o.lr:g})", o.min_lr,
                                  fix=f"use a floor below the peak, e.g. {o.lr / 100:g} (lr / 100), or 0"))
    if _changed(o, "min_lr") and o.schedule == "constant":
        issues.append(RecipeIssue(("optim", "min_lr"), "is the floor of the cosine schedule but optim.schedule is "
                                  "'constant'", o.min_lr, fix="remove optim.min_lr, or set optim.schedule: cosine"))
    if o.plateau is not None and o.schedule != "plateau":
        issues.append(RecipeIssue(("optim", "plateau"), f"is only read by schedule plateau, and optim.schedule is "
                                  f"'{o.schedule}'", o.plateau.model_dump(),
                                  fix="set optim.schedule: plateau, or remove optim.plateau"))
    elif o.plateau is not None:
        issues += _watched_metric_checks(recipe, ("optim", "plateau", "metric"), o.plateau.metric, "optim.plateau")
    return issues


def _watched_metric_checks(recipe: Recipe, path: tuple[str, ...], metric: str, owner: str) -> list[RecipeIssue]:
    """A decision taken on a validation metric (best checkpoint, plateau LR, early stop): the metric exists and
    there is validation."""
    names = val_metric_names(recipe.task, recipe.model.num_classes)
    if metric not in names:
        return [RecipeIssue(path, f"is not a validation metric of task '{recipe.task}'", metric,
                            fix=f"use one of {', '.join(names)}.{_metric_hint(metric, names)}")]
    if recipe.data.val is None:
        return [RecipeIssue(path, "needs validation, and data.val is not set", metric,
                            fix=f"add data.val (held-out tiles), or remove {owner}")]
    return []


def _train_checks(recipe: Recipe) -> list[RecipeIssue]:
    issues: list[RecipeIssue] = []
    t = recipe.train
    if t.best_metric is not None:
        issues += _watched_metric_checks(recipe, ("train", "best_metric"), t.best_metric, "train.best_metric")
    if t.early_stop is not None:
        issues += _watched_metric_checks(recipe, ("train", "early_stop", "metric"), t.early_stop.metric,
                                         "train.early_stop")
    for key in ("reshard_after_forward", "build_on_rank0"):
        if _changed(t, key) and t.strategy != "fsdp":
            issues.append(RecipeIssue(("train", key), f"is an FSDP option but train.strategy is '{t.strategy}'",
                                      getattr(t, key), fix="remove it, or set train.strategy: fsdp"))
    return issues
