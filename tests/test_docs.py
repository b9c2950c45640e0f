"""The documentation site (``avex docs``): env pages generated from the registry, a strict build that fails on a
broken reference or link, and every code block of the hand-written pages run as written."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import tempfile
from pathlib import Path

import gymnasium as gym
import pytest
from PIL import Image

import avex  # noqa: F401  (registers the env ids)
from avex.cli import docs, main
from envs.config import EnvConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None,
    reason="mkdocs and mkdocstrings-python are not installed (pip install -c constraints.txt -e '.[dev]')",
)
# What each hand-written page's code leaves behind, checked after it ran.
RESULTS = {
    "index.md": lambda ns: isinstance(ns["info"]["prediction"], int),
    "quickstart-sb3.md": lambda ns: ns["model"].num_timesteps >= 192 and len(ns["report"].accuracy) == 12,
    "quickstart-cleanrl.md": lambda ns: ns["iteration"] == 2 and bool(ns["loss"].isfinite()),
    "quickstart-timm.md": lambda ns: ns["checkpoint"].endswith(".safetensors") and len(ns["report"].accuracy) == 12,
}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of a Markdown page."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def argument_table(page: str, heading: str = "## Arguments") -> dict[str, tuple[str, str]]:
    """argument -> (default as written, where it came from), from the table under ``heading``."""
    section = page.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `(.*?)` \| ([\w ]+) \|", section, flags=re.M)
    return {name: (default.replace("\\|", "|"), source) for name, default, source in rows}


def test_env_pages_list_the_registered_defaults() -> None:
    ids = docs.avex_env_ids()
    assert {"AVE-FashionMNIST-v0", "AVE-ImageNet-v0", "AVE-ImageFolder-v0"} <= set(ids)
    for env_id in ids:
        table = argument_table(docs.env_page(env_id))
        for name, value in gym.spec(env_id).kwargs.items():
            assert table[name] == (repr(value), "registered"), (env_id, name)
        for field in dataclasses.fields(EnvConfig):
            if field.name != "options" and field.name not in gym.spec(env_id).kwargs:
                assert table[field.name] == (repr(field.default), "EnvConfig"), (env_id, field.name)
        vector = argument_table(docs.env_page(env_id), "## Vectorized environment")
        assert vector["num_envs"] == ("1", "AVEVectorEnv") and vector["autoreset_mode"][0] == "AutoresetMode.SAME_STEP"


def test_a_changed_default_changes_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = gym.spec("AVE-FashionMNIST-v0")
    changed = dataclasses.replace(spec, kwargs={**spec.kwargs, "budget": 7, "clutter": 2, "model": "vit_x|y"})
    monkeypatch.setitem(gym.registry, spec.id, changed)
    table = argument_table(docs.env_page(spec.id))
    assert table["budget"] == ("7", "registered") and table["clutter"] == ("2", "registered")
    assert table["model"] == ("'vit_x|y'", "registered")  # a | inside a cell is escaped, not a new column


def test_episode_gif_where_the_data_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_fmnist_root: Path
) -> None:
    monkeypatch.setenv("AVEX_FASHION_MNIST", str(fake_fmnist_root))
    gif = tmp_path / "episode.gif"
    page = docs.env_page("AVE-FashionMNIST-v0", gif, seed=3)
    with Image.open(gif) as image:
        assert image.n_frames == gym.spec("AVE-FashionMNIST-v0").kwargs["budget"] + 1  # the reset, then each glimpse
    assert "](episode.gif)" in page and "(seed 3)" in page
    assert "`Discrete(169)`" in page and "| `canvas` | `Box(0, 255, (112, 112, 1), uint8)` |" in page


def test_no_data_no_gif_and_the_page_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AVEX_IMAGENET", raising=False)
    gif = tmp_path / "imagenet.gif"
    page = docs.env_page("AVE-ImageNet-v0", gif)
    assert not gif.exists() and "No episode GIF" in page and "AVEX_IMAGENET" in page
    assert "Built here" not in page  # no spaces claimed for an env that was not built


def test_a_negative_seed_is_refused_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # env.reset(seed=-1) raises, and each env page used to report it as an id that could not be built here.
    out = tmp_path / "docs"
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        docs.write_docs(out, seed=-1)
    assert main(["docs", "--out", str(out), "--site", str(tmp_path / "site"), "--no-build", "--seed", "-1"]) == 2
    assert "--seed must be an integer >= 0, got -1" in capsys.readouterr().err and not out.exists()


def test_foreign_folders_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        docs.write_docs(tmp_path, gifs=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    out = tmp_path / "docs"
    assert main(["docs", "--out", str(out), "--site", str(out / "site"), "--no-gifs"]) == 2
    assert "separate folders" in capsys.readouterr().err and not out.exists()  # refused before writing


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``avex docs`` (no GIFs) once for the module: (the pages folder, the site)."""
    root = tmp_path_factory.mktemp("docs")
    out, site = root / "docs", root / "site"
    assert main(["docs", "--out", str(out), "--site", str(site), "--no-gifs"]) == 0
    return out, site


@needs_mkdocs
def test_the_site_builds(built: tuple[Path, Path]) -> None:
    out, site = built
    for env_id in docs.avex_env_ids():
        assert (site / "envs" / env_id / "index.html").is_file()
    assert 'id="avex.model.TOREViT"' in (site / "api" / "avex" / "index.html").read_text()
    assert 'id="envs.ave_env.AVEEnv"' in (site / "api" / "envs" / "index.html").read_text()
    assert (site / "quickstart-sb3" / "index.html").is_file() and (site / "cli" / "index.html").is_file()
    assert "benchmarks/RESULTS.md" in (out / "pages" / "readme.md").read_text()  # the README's link, as text


@needs_mkdocs
@pytest.mark.parametrize(
    "page, broken",
    [("api/avex.md", "\n::: avex.nope\n"), ("index.md", "\nSee [a page](nope.md).\n"), ("cli.md", "\n[x](#nope)\n")],
    ids=["reference", "link", "anchor"],
)
def test_a_broken_reference_fails_the_build(
    built: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str], page: str, broken: str
) -> None:
    out = shutil.copytree(built[0], tmp_path / "docs")
    with open(out / "pages" / page, "a") as f:
        f.write(broken)
    assert docs.build_site(out / "mkdocs.yml", tmp_path / "site") != 0
    assert "nope" in capfd.readouterr().err


@pytest.mark.parametrize("page", sorted(p.name for p in docs.PAGES.glob("*.md")))
def test_page_code_runs_as_written(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = fenced_blocks((docs.PAGES / page).read_text())
    assert blocks and all(language == "python" for language, _ in blocks), "every code block must be one this runs"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the pages' temporary folders land in tmp_path
    namespace: dict[str, object] = {}
    for _, code in blocks:
        exec(compile(code, str(docs.PAGES / page), "exec"), namespace)
    assert RESULTS[page](namespace)
