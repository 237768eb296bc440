"""The README's worked example is executed as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_factory_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md must contain the factory example as a python block"
    exec(compile(blocks[0], str(README), "exec"), {})
