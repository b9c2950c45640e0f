"""Shared pieces of the tests that run code outside the test process's usual imports: a benchmark script loaded as
a module (``benchmarks/`` is not a package), and a snippet run under Triton's CPU interpreter in a fresh process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interpreted(code: str) -> str:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton reads it at import); return its stdout.
    Fails the test with the end of stderr where the snippet fails."""
    # The repository and tests/ on the path: snippets import avex and test modules, which import their kits.
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_interpreted(module: str, call: str) -> None:
    """``call`` (an expression that asserts) from the test module ``module`` runs to its end under the interpreter:
    the common case of :func:`interpreted`, where the test module holds the check and its CUDA test reuses it."""
    name = call.split("(", 1)[0]
    out = interpreted(f"from {module} import {name}\n{call}\nprint('ok')")
    assert out.strip() == "ok", out[-3000:]
