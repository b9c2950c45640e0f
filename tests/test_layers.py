"""The layer contract: core (``avex.*``) -> ``envs`` -> ``agents`` -> the CLI and the ``import avex`` facade.

Every import in the three packages, at module level or inside a function, may point only at its own
layer or one below. Read from the source with ``ast``, so an import that only runs on some path is
checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("avex", "envs", "agents")
LAYERS = {"core": 0, "envs": 1, "agents": 2, "top": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str | None:
    """The layer of an avex/envs/agents module; None for anything else (stdlib, third party)."""
    top = module.split(".")[0]
    if top == "envs":
        return "envs"
    if top == "agents":
        return "agents"
    if top != "avex":
        return None
    if module == "avex" or module == "avex.cli" or module.startswith("avex.cli."):
        return "top"  # the facade (avex/__init__.py) and the command line
    return "core"


def is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, module) for every import in a file; ``from a import b`` counts as ``a.b`` when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = (
                    sub
                    if layer(base) and (is_package(sub) or (ROOT / f"{sub.replace('.', '/')}.py").exists())
                    else base
                )
                out.append((node.lineno, target))
    return out


def all_modules() -> list[tuple[Path, str]]:
    return [(p, module_name(p)) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def upward(path: Path, module: str) -> list[str]:
    """The imports of one file that point above its own layer, as 'line: target (layer)'."""
    own = layer(module)
    assert own is not None, module
    found = []
    for line, target in imported_modules(path, module):
        theirs = layer(target)
        if theirs is not None and LAYERS[theirs] > LAYERS[own]:
            found.append(f"{line}: {target} ({theirs})")
    return found


def upward_imports() -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{hit} from {module}"
        for path, module in all_modules()
        for hit in upward(path, module)
    ]


def test_layers_point_one_way() -> None:
    assert upward_imports() == []


def test_every_module_has_a_layer() -> None:
    modules = [m for _, m in all_modules()]
    assert {layer(m) for m in modules} == set(LAYERS)


@pytest.mark.parametrize(
    ("module", "source", "is_upward"),
    [
        ("avex.model", "import envs\n", True),
        ("avex.data.folder", "from agents.base import GlimpseAgent\n", True),
        ("avex.model", "import avex\n", True),  # the facade is the top layer
        ("envs.engine", "from agents import make_agent\n", True),
        ("envs.engine", "from avex.cli import main\n", True),
        ("envs.engine", "from avex.model import TOREViT\n", False),
        ("agents.ppo", "from envs.sb3 import SB3VecEnv\n", False),
        ("avex.cli.demo", "def f():\n    from agents import make_agent\n", False),
    ],
)
def test_the_check_sees_an_upward_import(tmp_path: Path, module: str, source: str, is_upward: bool) -> None:
    """The checker itself: a planted import is flagged exactly when it points upward (even inside a function)."""
    path = tmp_path / "planted.py"
    path.write_text(source)
    assert bool(upward(path, module)) == is_upward
