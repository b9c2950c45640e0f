"""The README's code runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = README.read_text()
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], flags=re.S)
    assert match is not None, f"no python block after {heading!r}"
    return match.group(1)


def test_sb3_quick_start_runs_as_written() -> None:
    namespace: dict[str, object] = {}
    exec(compile(readme_block("### Stable-baselines3, the short way"), str(README), "exec"), namespace)
    assert namespace["model"].num_timesteps >= 96  # type: ignore[attr-defined]
