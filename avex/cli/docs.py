"""``avex docs``: the documentation site, generated from the code and built with MkDocs.

Writes ``mkdocs.yml`` and Markdown pages into ``--out`` (default ``build/docs``), then runs ``mkdocs build
--strict`` into ``--site`` (default ``build/site``): a broken ``::: module`` reference, link or anchor is a
warning, so the build fails (``make test`` runs it). The pages:

* the home page and the quick starts, hand-written in ``avex/cli/docs_pages/`` (``tests/test_docs.py``
  runs every code block there), and the README;
* one page per registered env id: the defaults the id registers (``gymnasium.spec(id).kwargs``, the rest
  :class:`envs.config.EnvConfig`'s), :class:`envs.ave_env.AVEEnv`'s docstring sections, and where the data
  are here, the built env's spaces and a GIF of one random-agent episode (else the page says why not);
* the command line (every ``--help``) and the API reference, read by static analysis (griffe).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import importlib.util
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import yaml

import avex
from avex.checks import check_int
from avex.data import get_dataset
from envs.ave_env import AVEEnv
from envs.config import EnvConfig
from envs.registration import ENTRY_POINT, env_ids
from envs.render import save_gif
from envs.vector import AVEVectorEnv

__all__ = ["Argument", "add_arguments", "build_site", "env_arguments", "env_page", "main_from_args", "write_docs"]

PAGES = Path(__file__).with_name("docs_pages")  # the hand-written pages (package data)
ROOT = Path(avex.__file__).resolve().parents[1]  # holds avex/, envs/, agents/ (and README.md in a checkout)
PACKAGES = ("avex", "envs", "agents")
MARKER = ".avex-docs"  # a folder holding it was written by avex docs, which may rewrite it (mkdocs keeps dot files)
_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|obj|exc):`~?([^`]+)`")
_ENTRY = re.compile(r"^ {4}(\w+): (.*)$")  # "    name: text" in a cleaned docstring's Args/Attributes list


@dataclass(frozen=True)
class Argument:
    """One keyword argument of an env id, for its page.

    Attributes:
        name: the keyword.
        default: what the id passes when the caller does not.
        source: where that default is read: ``"registered"`` (the id's kwargs in Gymnasium's registry),
            ``"EnvConfig"`` (the field's default), ``"data set"`` or the class whose signature has it.
        meaning: from the docstring that documents it (Markdown).
    """

    name: str
    default: Any
    source: str
    meaning: str


def _plain(text: str) -> str:
    """Docstring text as Markdown: Sphinx roles (``:class:`x```) become optional cross-references (a link
    where ``x`` is documented, else code), as ``docs_pages/griffe_roles.py`` makes them in the API pages."""
    return _ROLE.sub(r'<autoref identifier="\1" optional><code>\1</code></autoref>', text)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def doc_entries(doc: str | None) -> dict[str, str]:
    """``name: text`` entries of a docstring's lists (Args, Attributes, EnvConfig's groups), continuations joined."""
    entries: dict[str, str] = {}
    name: str | None = None
    for line in inspect.cleandoc(doc or "").splitlines():
        match = _ENTRY.match(line)
        if match:
            name = match.group(1)
            entries[name] = match.group(2)
        elif name is not None and line.startswith(" " * 8):
            entries[name] += " " + line.strip()
        else:
            name = None
    return {key: _plain(text) for key, text in entries.items()}


def doc_sections(doc: str | None) -> dict[str, str]:
    """The ``## Title`` sections of a docstring (Gymnasium's env docstring layout), in order."""
    sections: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for line in inspect.cleandoc(doc or "").splitlines():
        if line.startswith("## "):
            lines = sections.setdefault(line[3:].strip(), [])
        elif lines is not None:
            lines.append(line)
    return {title: _plain("\n".join(body).strip()) for title, body in sections.items()}


def avex_env_ids() -> list[str]:
    """The registered ids whose entry point is :class:`envs.ave_env.AVEEnv`, in data-set order."""
    return [i for i in env_ids().values() if i in gym.registry and gym.registry[i].entry_point == ENTRY_POINT]


def env_arguments(env_id: str) -> list[Argument]:
    """Every keyword of ``gym.make(env_id, ...)`` with the default that id gets: its registered kwargs, then
    :class:`envs.config.EnvConfig`'s field defaults, the data set's options and ``render_mode``."""
    registered = dict(gym.spec(env_id).kwargs)
    spec = get_dataset(registered.get("dataset", EnvConfig.dataset))
    meanings = doc_entries(EnvConfig.__doc__)
    rows: list[Argument] = []
    for field in dataclasses.fields(EnvConfig):
        if field.name == "options":  # passed as plain keywords: the data set's options below
            continue
        if field.name in registered:
            rows.append(Argument(field.name, registered.pop(field.name), "registered", ""))
        else:
            factory = field.default_factory
            default = field.default if factory is dataclasses.MISSING else factory()
            rows.append(Argument(field.name, default, "EnvConfig", ""))
    module = spec.build.__module__
    where = f"[`{module}`][{module}]" if module.split(".")[0] in PACKAGES else f"`{module}`"
    for name, value in spec.options.items():
        default, source = (registered.pop(name), "registered") if name in registered else (value, "data set")
        rows.append(Argument(name, default, source, f"option of the `{spec.name}` data set (its builder: {where})"))
    rows += [Argument(name, value, "registered", "") for name, value in registered.items()]  # none today
    render = inspect.signature(AVEEnv.__init__).parameters["render_mode"].default
    rows.append(Argument("render_mode", render, "AVEEnv", '`"rgb_array"`: `render()` returns the frame of the GIF'))
    return [dataclasses.replace(row, meaning=row.meaning or meanings.get(row.name, "")) for row in rows]


def vector_arguments() -> list[Argument]:
    """The keywords ``gym.make_vec`` adds for :class:`envs.vector.AVEVectorEnv`, with their defaults."""
    meanings = doc_entries(AVEVectorEnv.__doc__)
    params = inspect.signature(AVEVectorEnv.__init__).parameters.values()
    return [
        Argument(p.name, p.default, "AVEVectorEnv", meanings.get(p.name, ""))
        for p in params
        if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def default_text(value: Any) -> str:
    """A default as Python would spell it (an enum member by its name, not its repr)."""
    return f"{type(value).__name__}.{value.name}" if isinstance(value, enum.Enum) else repr(value)


def _table(rows: list[Argument]) -> list[str]:
    lines = ["| argument | default | from | meaning |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| `{row.name}` | `{_cell(default_text(row.default))}` | {row.source} | {_cell(row.meaning)} |")
    return lines


def record_random_episode(env_id: str, path: Path, seed: int = 0) -> tuple[str, dict[str, str]]:
    """Play one episode of uniformly random allowed glimpses with the id's defaults; write its frames as a GIF.

    Returns:
        The action space and each observation key's space, as text.

    Raises:
        What ``gym.make`` raises where the id's data or model are not on this machine (ValueError, OSError...).
    """
    env = gym.make(env_id, render_mode="rgb_array")
    try:
        env.action_space.seed(seed)
        _, info = env.reset(seed=seed)
        frames = [np.asarray(env.render())]
        done = False
        while not done:
            mask = info["action_mask"] if isinstance(env.action_space, gym.spaces.Discrete) else None
            _, _, terminated, truncated, info = env.step(env.action_space.sample(mask=mask))
            frames.append(np.asarray(env.render()))
            done = terminated or truncated
        save_gif(frames, path, fps=env.metadata.get("render_fps", 2))
        spaces = getattr(env.observation_space, "spaces", {})
        return str(env.action_space), {key: str(space) for key, space in spaces.items()}
    finally:
        env.close()


def _episode(env_id: str, gif: Path | None, seed: int) -> tuple[list[str], str, dict[str, str]]:
    """The page's episode paragraph, and the action and observation spaces of the env built here (or empty)."""
    if gif is None:
        return ["*No episode was recorded for this build (`avex docs --no-gifs`).*"], "", {}
    try:
        action, observation = record_random_episode(env_id, gif, seed)
    except (ValueError, OSError, RuntimeError, gym.error.Error) as err:
        note = "No episode GIF: this id could not be built with its defaults where these pages were built"
        lines = [f"*{note} (its data or model are not there). What it said:*", "", "```text"]
        return [*lines, f"{type(err).__name__}: {err}", "```"], "", {}
    caption = f"One episode of uniformly random allowed glimpses (seed {seed}), recorded when this page was built."
    return [f"![{caption}]({gif.name})", "", f"*{caption}*"], action, observation


def env_page(env_id: str, gif: Path | None = None, seed: int = 0) -> str:
    """The Markdown page of one env id. With ``gif`` a path, one random-agent episode is recorded there
    (and the spaces of the env built here are listed) if the id can be built on this machine."""
    args = env_arguments(env_id)
    dataset = get_dataset(next(a.default for a in args if a.name == "dataset"))
    episode, action, observation = _episode(env_id, gif, seed)
    lines = [f"# {env_id}", "", f"{dataset.description or dataset.name}.", ""]
    lines += ["| | |", "|---|---|", f"| data set | `{dataset.name}` |"]
    lines += [f'| make | `gym.make("{env_id}")`, `gym.make_vec("{env_id}", num_envs=N)` |']
    lines += [f"| classes | `{ENTRY_POINT}`, vector `{gym.spec(env_id).vector_entry_point}` |", ""]
    lines += [*episode, ""]
    for title, body in doc_sections(AVEEnv.__doc__).items():
        lines += [f"## {title}", ""]
        if title == "Action Space" and action:
            lines += [f"Built here with this id's defaults: `{action}`.", ""]
        if title == "Observation Space" and observation:
            lines += ["Built here with this id's defaults:", "", "| key | space |", "|---|---|"]
            lines += [f"| `{key}` | `{_cell(space)}` |" for key, space in observation.items()] + [""]
        if title == "Arguments":  # the docstring's list covers every id; this table is the id's own
            lines += [f"The defaults `{env_id}` registers (read from Gymnasium's registry when this page was"]
            lines += ["built), then `EnvConfig`'s: pass any of them to `gym.make` to change it.", ""]
            body = "\n".join(_table(args))
        if title == "Vectorized environment":
            body += "\n\n" + "\n".join(_table(vector_arguments()))
        lines += [body, ""]
    return "\n".join(lines)


def api_pages() -> dict[str, list[str]]:
    """API page name -> the public modules on it (no ``_`` in the name, not the command line): each package's
    page holds the package and its plain modules, a sub-package gets a page of its own."""
    pages: dict[str, list[str]] = {}
    for top in PACKAGES:
        pages[top] = [top]
        for info in pkgutil.walk_packages(importlib.import_module(top).__path__, f"{top}."):
            if any(part.startswith("_") for part in info.name.split(".")) or info.name.startswith("avex.cli"):
                continue
            page = info.name if info.ispkg else info.name.rpartition(".")[0]
            pages.setdefault(page, []).append(info.name)
    return pages


def _api_page(name: str, modules: list[str]) -> str:
    lines = [f"# `{name}`", ""]
    for module in modules:
        lines.append(f"::: {module}")
        if module == name:  # a package re-exports its modules' members: documented there, not twice
            lines += ["    options:", "      members: false"]
        lines.append("")
    return "\n".join(lines)


def _cli_page() -> str:
    from avex.cli import build_parser  # here: avex.cli imports this module

    lines = ["# Command line", "", "Every `avex` subcommand, as its `--help` prints it.", ""]

    def add(parser: argparse.ArgumentParser, command: str) -> None:
        lines.extend([f"## `{command}`", "", "```text", parser.format_help().rstrip(), "```", ""])
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    add(sub, f"{command} {name}")

    add(build_parser(), "avex")
    return "\n".join(lines)


def _readme_page() -> str:
    """The README, its links to files outside the site turned into code spans (mkdocs could not resolve them)."""
    readme = ROOT / "README.md"
    if not readme.is_file():
        return f"# README\n\nNo README.md next to the installed packages ({ROOT}): build the docs from a checkout.\n"

    def unlink(match: re.Match[str]) -> str:
        text, target = match.group(1), match.group(2)
        if re.match(r"[a-z]+:|#", target):
            return match.group(0)
        return f"`{target}`" if text.strip("`") == target else f"{text} (`{target}`)"

    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", unlink, readme.read_text())


def _claim(folder: Path) -> None:
    """Make ``folder`` ours: new, empty, or written by an earlier run (it holds :data:`MARKER`); else ValueError."""
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / MARKER).exists())):
        raise ValueError(f"{folder} holds files that avex docs did not write: pass a new or empty folder")


def write_docs(out: str | Path, gifs: bool = True, seed: int = 0) -> Path:
    """Write ``mkdocs.yml`` and the pages (under ``out/pages``) into ``out``, replacing an earlier run's.

    Args:
        out: the folder; refused (ValueError) if it holds files another program wrote.
        gifs: record one random-agent episode per env id whose data are on this machine.
        seed: the episodes' seed, an int >= 0 (refused before anything is written: a bad one would make every
            page say its id could not be built).

    Returns:
        The path of ``mkdocs.yml``.
    """
    check_int("seed", seed, 0)
    out = Path(out)
    _claim(out)
    shutil.rmtree(out, ignore_errors=True)
    pages = out / "pages"
    (pages / "envs").mkdir(parents=True)
    (pages / "api").mkdir()
    (out / MARKER).touch()
    ids = avex_env_ids()
    index = (PAGES / "index.md").read_text().rstrip() + "\n\n## Environments\n\n| id | data |\n|---|---|\n"
    index += "".join(
        f"| [{i}](envs/{i}.md) | {_cell(get_dataset(gym.spec(i).kwargs['dataset']).description)} |\n" for i in ids
    )
    (pages / "index.md").write_text(index)
    (pages / "readme.md").write_text(_readme_page())
    nav: list[Any] = [{"Home": "index.md"}, {"README": "readme.md"}]
    quick = []
    for page in sorted(PAGES.glob("quickstart-*.md")):
        text = page.read_text()
        (pages / page.name).write_text(text)
        title = next((line[2:] for line in text.splitlines() if line.startswith("# ")), page.stem)
        quick.append({title.removeprefix("Quick start: "): page.name})
    nav.append({"Quick starts": quick})
    for env_id in ids:
        gif = pages / "envs" / f"{env_id}.gif" if gifs else None
        (pages / "envs" / f"{env_id}.md").write_text(env_page(env_id, gif, seed))
    nav.append({"Environments": [{i: f"envs/{i}.md"} for i in ids]})
    (pages / "cli.md").write_text(_cli_page())
    nav.append({"Command line": "cli.md"})
    api = api_pages()
    for name, modules in api.items():
        (pages / "api" / f"{name}.md").write_text(_api_page(name, modules))
    nav.append({"API reference": [{name: f"api/{name}.md"} for name in api]})
    shutil.copy(PAGES / "pygments.css", pages)
    config = _mkdocs_config(nav)
    path = out / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _mkdocs_config(nav: list[Any]) -> dict[str, Any]:
    """``docs_pages/mkdocs-base.yml`` with the generated parts filled in."""
    config: dict[str, Any] = yaml.safe_load((PAGES / "mkdocs-base.yml").read_text())
    config.update(nav=nav, site_description=(avex.__doc__ or "").strip().splitlines()[0])
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            python = plugin["mkdocstrings"]["handlers"]["python"]
            python["paths"] = [str(ROOT)]
            python["options"]["extensions"] = [f"{PAGES / 'griffe_roles.py'}:SphinxRoles"]
    return config


def _check_mkdocs() -> None:
    missing = [name for name in ("mkdocs", "mkdocstrings_handlers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"{' and '.join(missing)} not installed: pip install -c constraints.txt -e '.[dev]' "
            "(or pass --no-build to write the pages only)"
        )


def build_site(config: str | Path, site: str | Path) -> int:
    """``mkdocs build --strict`` of ``config`` into ``site``. Returns mkdocs's exit status: non-zero on any
    warning (a broken ``:::`` reference, link or anchor).

    Raises:
        ValueError: mkdocs or mkdocstrings-python is not installed, or ``site`` holds files another program wrote.
    """
    _check_mkdocs()
    site = Path(site)
    _claim(site)
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config)]
    code = subprocess.run([*command, "--site-dir", str(site.resolve())], check=False).returncode
    if site.is_dir():
        (site / MARKER).touch()
    return code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="build/docs", help="where mkdocs.yml and the pages go (default: %(default)s)")
    p.add_argument("--site", default="build/site", help="where the site is built (default: %(default)s)")
    p.add_argument("--no-build", action="store_true", help="write the pages only, without running mkdocs")
    p.add_argument("--no-gifs", action="store_true", help="record no episode GIFs (and build no env)")
    p.add_argument("--seed", type=int, default=0, help="seed of the recorded episodes (default: %(default)s)")


def main_from_args(args: argparse.Namespace) -> int:
    check_int("--seed", args.seed, 0)  # env.reset refuses it, which each env page would report as an id not built
    out, site = Path(args.out).resolve(), Path(args.site).resolve()
    if out == site or out in site.parents or site in out.parents:
        raise ValueError(f"--out {args.out} and --site {args.site} must be separate folders, neither inside the other")
    if not args.no_build:  # refused before anything is written
        _check_mkdocs()
        _claim(site)
    config = write_docs(out, gifs=not args.no_gifs, seed=args.seed)
    print(f"pages written to {out}")
    if args.no_build:
        return 0
    code = build_site(config, site)
    print(f"site written to {site}" if code == 0 else f"mkdocs build --strict failed (exit status {code}): see above")
    return code
