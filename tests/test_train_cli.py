"""Tests for avex.train's command line, derived from TrainConfig's fields, and for the package's layering."""

from __future__ import annotations

import argparse
import ast
from dataclasses import fields
from pathlib import Path

import pytest

import avex.train
from avex.train import TrainConfig, add_arguments, config_from_args

FREE_FORM = {"extra"}  # config fields with no command-line form


def _parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="avex train classifier"))


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_one_option_per_field_and_the_defaults_are_the_dataclass_defaults() -> None:
    parser = _parser()
    dests = [a.dest for a in _options(parser)]
    assert sorted(dests) == sorted(f.name for f in fields(TrainConfig) if f.name not in FREE_FORM)
    assert config_from_args(parser.parse_args([])) == TrainConfig()
    for action in _options(parser):  # every option says what it does and what it defaults to
        assert action.help and "(default: " in action.help, action.option_strings
    titles = [g.title for g in parser._action_groups]
    assert {"data", "optimisation"} <= set(titles) and any(t and t.startswith("model") for t in titles)


def test_flags_keep_their_spelling_and_round_trip() -> None:
    parser = _parser()
    spelled = {s for a in _options(parser) for s in a.option_strings}
    assert {"--data-root", "--train-k", "--no-amp", "--no-progress", "--label-smoothing", "--pos-init"} <= spelled
    cfg = config_from_args(
        parser.parse_args(
            ["--train-k", "6", "7", "--mean", "0.1,0.2", "--label-smoothing", "--no-amp", "--steps", "3", "--compile"]
        )
    )
    assert cfg.train_k == (6, 7) and cfg.mean == (0.1, 0.2) and cfg.label_smoothing == 0.1
    assert cfg.amp is False and cfg.progress is True and cfg.steps == 3 and cfg.compile is True
    assert cfg.std is None and cfg.lr is None  # unset: the dataset's default, filled by resolve_config
    cfg = config_from_args(parser.parse_args(["--label-smoothing", "0.2", "--no-progress", "--pos-init", "learned"]))
    assert cfg.label_smoothing == 0.2 and cfg.progress is False and cfg.amp is True and cfg.pos_init == "learned"
    assert config_from_args(parser.parse_args(["--train-split", ""])).train_split == ""


@pytest.mark.parametrize("argv", [["--pos-init", "fourier"], ["--mean", "0.1,x"], ["--train-k"], ["--steps", "1.5"]])
def test_bad_values_are_refused_by_the_parser(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)


def test_config_from_args_ignores_other_attributes() -> None:
    args = _parser().parse_args(["--seed", "3"])
    args.func, args.what = print, "classifier"  # what the ``avex`` sub-command parser adds
    assert config_from_args(args) == TrainConfig(seed=3)


def test_training_imports_no_env_agent_or_cli_code() -> None:
    """Layers point one way: avex.train may use the core (avex.model, avex.data...), never envs, agents or the CLI.

    Checked on the sources: ``import avex`` itself (the package facade) loads envs, whoever imports it.
    """
    imported = set()
    for path in Path(avex.train.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {(path.name, a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add((path.name, node.module))
    assert any(m == "avex.model" for _, m in imported)  # the walk sees the package's imports
    bad = [(f, m) for f, m in imported if m.split(".")[0] in ("envs", "agents") or m.startswith("avex.cli")]
    assert not bad, bad
