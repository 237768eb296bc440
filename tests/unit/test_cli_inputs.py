"""What the CLI reads from users and records for them: YAML with duplicate keys is refused, ``--resume RUN --set``
is written into the run's recipe.yaml (the old one kept), the dashboard line names the token file, not the token."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from encdec.config.yaml_load import DuplicateKeyError, NotTextError, read_text, safe_load
from encdec.launcher.cli import _normalise_argv, build_parser
from encdec.launcher.commands.launch import load_for_run, open_run_dir
from encdec.launcher.ray import ray_auth
from encdec.launcher.recipe.errors import RecipeError
from encdec.launcher.recipe.validate import load_recipe

RECIPE = {
    "task": "segmentation",
    "model": {"backbone": "prithvi_eo_tiny", "decoder": "FCNDecoder", "num_classes": 2},
    "data": {"train": {"tiles": "/data/train"}, "global_batch_size": 4},
    "train": {"max_steps": 10},
}


def test_duplicate_keys_refused_at_any_depth_merge_keys_allowed() -> None:
    text = "a: 1\nb:\n  c: 2\n  c: 3\nbase: &x {k: 1}\nd:\n  <<: *x\n  k: 2\na: 4\n"
    with pytest.raises(DuplicateKeyError) as err:
        safe_load(text)
    assert err.value.problem_mark is not None and err.value.problem_mark.line + 1 == 9
    assert [(d.path, d.first_line, d.line) for d in err.value.duplicates] == [(("b", "c"), 3, 4), (("a",), 1, 9)]
    assert safe_load("base: &x {k: 1}\nd:\n  <<: *x\n  k: 2\n")["d"] == {"k": 2}  # YAML's own override stays
    assert yaml.safe_load(text)["a"] == 4  # what PyYAML does silently


def test_keys_spelled_differently_but_equal_are_named(tmp_path: Path) -> None:
    # yes/true (and 1/1.0) are one key once YAML reads them: every reader names it, never an empty list
    with pytest.raises(DuplicateKeyError) as err:
        safe_load("a:\n  yes: 1\n  true: 2\nb: {1: x, 1.0: y}\n")
    assert [d.describe() for d in err.value.duplicates] == [
        "'a.true' is given twice (lines 2 and 3; 'yes' and 'true' both read as True); YAML would keep only the last",
        "'b.1.0' is given twice (lines 4 and 4; '1' and '1.0' both read as 1); YAML would keep only the last"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False) + "yes: 1\ntrue: 2\n")
    with pytest.raises(RecipeError) as rerr:
        load_recipe(recipe)
    assert rerr.value.paths() == ["true"]
    assert "is given twice (first at line 12, 'yes' and 'true' both read as True)" in str(rerr.value)


def test_safe_load_never_builds_objects() -> None:
    with pytest.raises(yaml.YAMLError):
        safe_load("x: !!python/object/apply:os.system ['true']\n")


def test_read_text_refuses_what_is_not_yaml(tmp_path: Path) -> None:
    (tmp_path / "img.tif").write_bytes(b"II*\x00" + bytes(100))
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    for path, text in ((tmp_path, "is a directory"), (tmp_path / "img.tif", "TIFF/GeoTIFF"),
                       (tmp_path / "latin1.yaml", "is not UTF-8 text")):
        with pytest.raises(NotTextError, match=text):
            read_text(path, "recipe")


def test_recipe_lists_every_duplicate_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE, sort_keys=False) + "train:\n  epochs: 2\ntask: regression\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.paths() == ["train", "task"]
    assert "is given twice (first at line" in str(err.value) and f"{path}:" in str(err.value)


def _args(*argv: str) -> object:
    return build_parser().parse_args(_normalise_argv(list(argv)))


def test_resume_with_set_is_recorded_in_the_run_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({**RECIPE, "cluster": {"storage": str(tmp_path / "runs")}}))
    recipe, existing, _ = load_for_run(_args(str(recipe_file)))  # type: ignore[arg-type]
    run = open_run_dir(recipe, existing, "local")
    first = (run / "recipe.yaml").read_text()

    recipe, existing, _ = load_for_run(_args("--resume", str(run), "--set", "train.max_steps=16"))  # type: ignore[arg-type]
    open_run_dir(recipe, existing, "local")
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 16
    assert (run / "recipe.prev-1.yaml").read_text() == first  # the replaced recipe is kept, word for word

    recipe, existing, _ = load_for_run(_args("--resume", str(run)))  # type: ignore[arg-type]
    assert recipe.train.max_steps == 16  # a later resume continues with the recorded value
    open_run_dir(recipe, existing, "local")
    assert not (run / "recipe.prev-2.yaml").exists()  # nothing changed: no new history file
    recipe, existing, _ = load_for_run(_args("--resume", str(run), "--set", "train.max_steps=20"))  # type: ignore[arg-type]
    open_run_dir(recipe, existing, "local")
    assert yaml.safe_load((run / "recipe.prev-2.yaml").read_text())["train"]["max_steps"] == 16
    assert '"recipe_replaced": "recipe.prev-2.yaml"' in (run / "launch.json").read_text()


def test_dashboard_line_names_the_token_file_never_the_token(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "ray_auth_token"
    token.write_text("s3cr3t-token-value")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    line = ray_auth.dashboard_line("http://127.0.0.1:8265")
    assert line.startswith("dashboard: http://127.0.0.1:8265") and str(token) in line
    assert "s3cr3t" not in line
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token-value")
    line = ray_auth.dashboard_line("http://h:8265")
    assert "$RAY_AUTH_TOKEN" in line and "s3cr3t" not in line
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_auth.dashboard_line("http://h:8265") == "dashboard: http://h:8265"


@pytest.mark.parametrize(("backbone", "close"), [("prithvi_eo_tiny", "pretrained"), ("timm_resnet18", "pretrained")])
def test_misspelt_backbone_argument_named_without_and_at_build(backbone: str, close: str) -> None:
    from encdec.launcher.preflight.static_checks import static_checks
    from encdec.launcher.recipe.validate import recipe_from_dict
    from encdec.models.factory import FactoryError, build_model

    model = {**RECIPE["model"], "backbone": backbone, "backbone_pretrianed": False,  # type: ignore[dict-item]
             "backbone_kwargs": {"drop_path_rat": 0.1}}
    recipe = recipe_from_dict({**RECIPE, "model": model})
    issues = {i.path: i for i in static_checks(recipe)}
    assert set(issues) == {("model", "backbone_pretrianed"), ("model", "backbone_kwargs", "drop_path_rat")}
    assert f"Did you mean '{close}'" in issues[("model", "backbone_pretrianed")].fix
    assert "Did you mean 'drop_path_rate'" in issues[("model", "backbone_kwargs", "drop_path_rat")].fix
    with pytest.raises(FactoryError, match=r"'pretrianed' \(did you mean 'pretrained'\?\)"):
        build_model("segmentation", backbone, "FCNDecoder", num_classes=2, backbone_pretrianed=False)


def test_static_checks_pass_valid_arguments_and_check_channels() -> None:
    from encdec.launcher.preflight.static_checks import static_checks
    from encdec.launcher.recipe.validate import recipe_from_dict

    model = {**RECIPE["model"], "backbone": "timm_resnet18", "backbone_drop_path_rate": 0.1,  # type: ignore[dict-item]
             "backbone_out_indices": [1, 2], "backbone_output_stride": 16, "backbone_in_chans": 6}
    assert static_checks(recipe_from_dict({**RECIPE, "model": model})) == []
    issues = static_checks(recipe_from_dict({**RECIPE, "model": {**model, "backbone_in_chans": 4}}))
    assert [i.path for i in issues] == [("model", "backbone_in_chans")] and "data.bands has 6" in issues[0].message
