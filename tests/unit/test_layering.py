"""Structure checks that keep the recipe flowing one way: the layering contract (import-linter, as CI runs it),
no re-parsing of recipe sections outside ``encdec.config``, and small files."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from encdec import config

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "encdec"

#: every key a recipe section defines (a ``.get`` of one of these on a section-like value re-parses the recipe)
SECTION_KEYS = {name for cls in vars(config).values() if isinstance(cls, type) and issubclass(cls, config.Section)
                for name in cls.model_fields}
#: names the code gives to recipe sections (or did, when they travelled as dicts)
SECTION_NAMES = {"cfg", "config", "section", "recipe", "model", "loss", "data", "optim", "train", "run", "cluster"}


def _receiver(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value  # config["data"].get(...)
    return None


def section_gets(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every ``<section>.get("<section key>", default)`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"):
            continue
        if len(node.args) + len(node.keywords) < 2 or not node.args:
            continue
        key = node.args[0]
        if not (isinstance(key, ast.Constant) and key.value in SECTION_KEYS):
            continue
        who = _receiver(node.func.value)
        if who is not None and (who in SECTION_NAMES or who.endswith(("_cfg", "_section", "_config"))):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_check_finds_a_section_reparse() -> None:
    src = "def f(optim_cfg, data, x):\n    a = optim_cfg.get('lr', 1e-4)\n    b = data.get('img_size', 224)\n" \
          "    c = x.get('lr', 1)\n    d = data.get('unrelated', 1)\n    return config['train'].get('max_steps', 1)\n"
    assert [line for line, _ in section_gets(src)] == [2, 3, 6]


def test_no_section_get_with_default_outside_config() -> None:
    offenders = [f"{path.relative_to(REPO)}:{line}: {text}"
                 for path in sorted(PACKAGE.rglob("*.py")) if PACKAGE / "config" not in path.parents
                 for line, text in section_gets(path.read_text())]
    assert offenders == [], "recipe sections are typed objects (encdec.config); read their attributes:\n" + \
        "\n".join(offenders)


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed (pip install -e '.[dev]')")
def test_layering_contract() -> None:
    """config < registry < models < data < distributed < train < launcher (pyproject.toml), as `make lint-imports`."""
    exe = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


@pytest.mark.parametrize("package", ["models", "train", "config", "data", "distributed"])
def test_no_file_over_500_lines(package: str) -> None:
    long = {str(p.relative_to(REPO)): n for p in (PACKAGE / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}, f"split these along their seams: {long}"
