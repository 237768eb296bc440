"""Recipe validation: cross-section rules, pydantic errors turned into RecipeIssues, and loading with overrides.

Every layer collects all of its problems; ``load_recipe`` raises one RecipeError listing them, each with the
YAML path, the line (or the ``--set``/flag it came from), the bad value and the fix (with a did-you-mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from encdec.config import HLS_BANDS, LOSSES, MODEL_PREFIXES, ModelSection
from encdec.launcher.recipe.errors import (
    LineMap,
    RecipeError,
    RecipeIssue,
    did_you_mean,
    line_map,
    missing_mapping_issue,
    yaml_syntax_issue,
)
from encdec.launcher.recipe.schema import Recipe

__all__ = ["cross_checks", "field_at", "load_recipe", "read_recipe_data", "recipe_from_dict"]


# --------------------------------------------------------------------------------------------- cross-field rules
def cross_checks(recipe: Recipe) -> list[RecipeIssue]:
    """Rules that span sections. Returns every violation (not just the first)."""
    issues: list[RecipeIssue] = []
    task, m, loss = recipe.task, recipe.model, recipe.loss
    allowed = LOSSES[task]
    if loss.name is not None and loss.name not in allowed:
        issues.append(
            RecipeIssue(("loss", "name"), f"loss '{loss.name}' does not fit task '{task}'", loss.name,
                        fix=f"use one of {', '.join(allowed)}")
        )
    if loss.class_weights is not None and task not in ("segmentation", "classification"):
        issues.append(RecipeIssue(("loss", "class_weights"), f"class weights do not apply to task '{task}'",
                                  loss.class_weights, fix="remove loss.class_weights"))
    d = recipe.data
    if (d.means is None or d.stds is None) and not d.uses_hls_stats:
        missing = "means" if d.means is None else "stds"
        issues.append(RecipeIssue(("data", missing), f"is needed: default statistics exist only for the six HLS bands "
                                  f"{list(HLS_BANDS)}", has_value=False,
                                  fix="run `encdec-launch stats <tiles>` and paste its means/stds"))
    if task in ("segmentation", "classification") and m.num_classes is None:
        issues.append(
            RecipeIssue(("model", "num_classes"), f"task '{task}' needs the number of classes", has_value=False,
                        fix="add `num_classes: N` to the model section (2 for water / not water)")
        )
    if loss.class_weights is not None and m.num_classes is not None and len(loss.class_weights) != m.num_classes:
        issues.append(
            RecipeIssue(("loss", "class_weights"),
                        f"has {len(loss.class_weights)} weights but model.num_classes is {m.num_classes}",
                        loss.class_weights, fix=f"give exactly {m.num_classes} weights, or null")
        )
    names = recipe.data.class_names
    if names is not None and task not in ("segmentation", "classification"):
        issues.append(RecipeIssue(("data", "class_names"), f"class names do not apply to task '{task}'", names,
                                  fix="remove data.class_names"))
    elif names is not None and m.num_classes is not None and len(names) != m.num_classes:
        issues.append(RecipeIssue(("data", "class_names"),
                                  f"has {len(names)} names but model.num_classes is {m.num_classes}", names,
                                  fix=f"give exactly {m.num_classes} names in label order, or remove it"))
    bb_bands = m.backbone_arg("bands")
    if bb_bands is not None and [str(b) for b in bb_bands] != [str(b) for b in recipe.data.bands]:
        issues.append(
            RecipeIssue(("model", "backbone_bands"), "differs from data.bands (the model would see bands in another "
                        "order than it expects)", bb_bands, fix=f"make them equal: {recipe.data.bands}")
        )
    bb_frames = m.backbone_arg("num_frames")
    if bb_frames is not None and bb_frames != recipe.data.num_frames:
        issues.append(
            RecipeIssue(("data", "num_frames"), f"differs from model.backbone_num_frames={bb_frames}",
                        recipe.data.num_frames, fix="set both to the number of time steps per sample")
        )
    world = recipe.cluster.world_size
    if recipe.train.strategy == "none" and world > 1:
        issues.append(
            RecipeIssue(("train", "strategy"), f"'none' runs a single process but the cluster asks for {world} workers",
                        "none", fix="use ddp, fsdp or deepspeed, or set cluster.nodes=1 and workers_per_node=1")
        )
    per = world * recipe.optim.grad_accum
    gbs = recipe.data.global_batch_size
    if gbs % per:
        lower, upper = max(per, gbs - gbs % per), gbs - gbs % per + per
        issues.append(
            RecipeIssue(("data", "global_batch_size"),
                        f"is not divisible by workers ({world}) x optim.grad_accum ({recipe.optim.grad_accum}) = {per}",
                        gbs, fix=f"use a multiple of {per} (e.g. {lower} or {upper}), or change the worker count")
        )
    if m.peft_config is not None and m.peft_config.method == "LORA":
        kw = m.peft_config.peft_config_kwargs
        if not kw.get("target_modules"):
            issues.append(
                RecipeIssue(("model", "peft_config", "peft_config_kwargs", "target_modules"),
                            "LoRA needs target modules", has_value=False,
                            fix="e.g. target_modules: [qkv.q_linear, qkv.v_linear] with replace_qkv: qkv")
            )
    from encdec.config.track import object_store_rule  # issue 16 hook

    if (why := object_store_rule(recipe.track, recipe.cluster.storage)) is not None:
        issues.append(RecipeIssue(("track", "mlflow", "tracking_uri"), why, has_value=False,
                                  fix="set track.mlflow.tracking_uri to your MLflow server, e.g. http://mlflow:5000"))
    from encdec.launcher.recipe.validate_options import option_checks

    return issues + option_checks(recipe)


# --------------------------------------------------------------------------------------------- loading
def _annotation_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside ``X | None`` / ``list[X]`` annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _annotation_model(arg)
        if found is not None:
            return found
    return None


def field_at(path: Sequence[str | int]) -> tuple[type[BaseModel] | None, Any]:
    """(model class holding the last key of ``path``, that field's FieldInfo or None)."""
    model: type[BaseModel] | None = Recipe
    info = None
    holder: type[BaseModel] | None = Recipe
    for part in path:
        if isinstance(part, int) or model is None:
            continue
        holder = model
        info = model.model_fields.get(part)
        if info is None:
            return holder, None
        model = _annotation_model(info.annotation)
    return holder, info


def _literal_choices(annotation: Any) -> list[Any]:
    if getattr(annotation, "__origin__", None) is Literal:
        return list(annotation.__args__)
    out: list[Any] = []
    for arg in getattr(annotation, "__args__", ()) or ():
        out += _literal_choices(arg)
    return out


def _issues_from_validation(err: ValidationError) -> list[RecipeIssue]:
    issues = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        kind, ctx = e["type"], e.get("ctx") or {}
        value = e.get("input")
        if kind == "extra_forbidden":
            key = loc[-1]
            holder, _ = field_at((*loc[:-1], "__x__"))
            fields = sorted(holder.model_fields) if holder else []
            issues.append(RecipeIssue(loc, "is not a recipe key", value,
                                      fix=(f"remove it or rename it.{did_you_mean(key, fields)} " if fields else "")
                                      + f"Allowed here: {', '.join(fields)}"))
        elif kind == "model_key":
            key = ctx["key"]
            issues.append(RecipeIssue((*loc, key), f"'{key}' is not a build_model argument",
                                      value.get(key) if isinstance(value, Mapping) else None,
                                      fix=f"prefix it with backbone_, decoder_ or head_ to route it to that part"
                                      f".{did_you_mean(key, ctx['fields'])} Named arguments: {', '.join(ctx['fields'])}"))
        elif kind == "missing":
            _, info = field_at(loc)
            desc = f" ({info.description})" if info is not None and info.description else ""
            issues.append(RecipeIssue(loc, "is required", has_value=False, fix=f"add `{loc[-1]}: ...`{desc}"))
        elif kind == "literal_error":
            _, info = field_at(loc)
            choices = _literal_choices(info.annotation) if info is not None else []
            issues.append(RecipeIssue(loc, f"must be one of {ctx.get('expected', choices)}", value,
                                      fix=("use one of " + ", ".join(map(str, choices)) + "."
                                           + did_you_mean(value, choices)) if choices else ""))
        elif kind in ("stats_length", "stds_positive", "train_length", "data_source"):
            sub = ctx.get("sub")
            path = (*loc, sub) if sub else loc
            fixes = {
                "stats_length": "give one value per band (or run `encdec-launch stats` to compute them)",
                "stds_positive": "standard deviations are positive; recompute with `encdec-launch stats`",
                "train_length": "set max_steps (steps) or epochs, not both",
                "data_source": "e.g. {tiles: data/train} or {manifest: train.parquet}",
            }
            issues.append(RecipeIssue(path, e["msg"], value.get(sub) if sub and isinstance(value, Mapping) else value,
                                      fix=fixes[kind]))
        else:
            _, info = field_at(loc)
            desc = info.description if info is not None and info.description else ""
            fix = f"give a valid value; {loc[-1]}: {desc}" if desc and loc else ""
            issues.append(RecipeIssue(loc, e["msg"][0].lower() + e["msg"][1:], value, fix=fix))
    return issues


def _model_key_issues(model: Any) -> list[RecipeIssue]:
    if not isinstance(model, Mapping):
        return []
    fields = sorted(ModelSection.model_fields)
    return [
        RecipeIssue(("model", key), f"'{key}' is not a build_model argument", value,
                    fix=f"prefix it with backbone_, decoder_ or head_ to route it to that part."
                    f"{did_you_mean(key, fields)} Named arguments: {', '.join(fields)}")
        for key, value in model.items()
        if key not in fields and not str(key).startswith(MODEL_PREFIXES)
    ]


def recipe_from_dict(data: Any, *, lines: LineMap | None = None, source: str | None = None) -> Recipe:
    """Validate plain data as a recipe; every problem is collected into one RecipeError."""
    lines = lines or LineMap(source)
    if not isinstance(data, Mapping):
        raise RecipeError([missing_mapping_issue(data, source or "recipe")], source)
    try:
        recipe = Recipe.model_validate(dict(data))
    except ValidationError as err:
        issues = _issues_from_validation(err)
        # The model validator stops at its first bad key; list every one.
        seen = {i.path for i in issues}
        issues += [i for i in _model_key_issues(data.get("model")) if i.path not in seen]
        raise RecipeError(lines.attach(issues), source) from None
    issues = cross_checks(recipe)
    if issues:
        raise RecipeError(lines.attach(issues), source)
    recipe._origin = (lines, source)
    return recipe


def read_recipe_data(path: str | Path) -> tuple[dict[str, Any], LineMap]:
    """Parse a recipe file into plain data plus its line map (YAML errors become a RecipeError)."""
    from encdec.config.yaml_load import DuplicateKeyError, NotTextError, read_text, safe_load

    path = Path(path)
    if not path.exists():
        raise RecipeError(
            [RecipeIssue((), "file not found", str(path), fix="check the path; shipped recipes are in recipes/")],
            str(path),
        )
    try:
        text = read_text(path, "recipe")
    except NotTextError as err:
        raise RecipeError([RecipeIssue((), str(err).replace(f"recipe {path} ", "", 1), has_value=False,
                                       fix="give a recipe .yaml file; shipped recipes are in recipes/")],
                          str(path)) from None
    try:
        data = safe_load(text)
    except DuplicateKeyError as err:
        # every duplicate at once, each at its own path and line (the last would silently win in plain YAML)
        raise RecipeError([RecipeIssue(d.path, f"is given twice (first at line {d.first_line}"
                                       f"{', ' + d.note if d.note else ''}); YAML would silently keep only the last",
                                       has_value=False, line=d.line, source=str(path),
                                       fix="keep one of them (merge the two sections into one)")
                           for d in err.duplicates], str(path)) from None
    except yaml.YAMLError as err:
        raise RecipeError([yaml_syntax_issue(err, path)], str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([missing_mapping_issue(data, str(path))], str(path))
    return data, line_map(text, str(path))


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *, flags: Mapping[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings (``--set``), applied in order; values are parsed as YAML.
        flags: CLI flag values keyed by recipe path (``{"cluster.nodes": 8}``), applied after overrides.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: every problem found (syntax, schema, overrides, cross-field rules), each with its path,
            line/source, value and fix.
    """
    from encdec.launcher.recipe.overrides import FLAG_LABELS, apply_flags, apply_overrides

    data, lines = read_recipe_data(path)
    # malformed overrides are reported together with whatever the valid ones and the file get wrong
    issues = apply_overrides(data, overrides, lines)
    issues += apply_flags(data, flags or {}, lines, FLAG_LABELS)
    try:
        recipe = recipe_from_dict(data, lines=lines, source=str(path))
    except RecipeError as err:
        raise RecipeError(issues + err.issues, str(path)) from None
    if issues:
        raise RecipeError(issues, str(path))
    return recipe
