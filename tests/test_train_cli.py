"""Tests for avex.train's command line, derived from TrainConfig's fields, and for the package's layering."""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import pytest

import avex.train
import avex.train.loop
from avex.train import TrainConfig, add_arguments, config_from_args, resolve_config, train_classifier

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


def test_a_fields_flag_is_spelled_once_by_avex_options() -> None:
    """avex.options.flag, which refusals use to name a field, spells every field as the parser does (a bool on by
    default as its --no- flag)."""
    from avex import options

    spelled = {a.dest: a.option_strings[0] for a in _options(_parser())}
    assert {f.name: options.flag(TrainConfig, f.name) for f in options.cli_fields(TrainConfig)} == spelled
    assert spelled["amp"] == "--no-amp" and spelled["train_k"] == "--train-k"


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


# ----------------------------------------------------------------------------------------------
# Numeric flags: refused by resolve_config, before any process, data or model is set up
# ----------------------------------------------------------------------------------------------

# (flags, the flag named in the refusal, the value as the refusal shows it)
BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size", "0"),
    (["--batch-size", "-4"], "--batch-size", "-4"),
    (["--eval-batch-size", "0"], "--eval-batch-size", "0"),
    (["--log-every", "0"], "--log-every", "0"),
    (["--std", "0"], "--std", "(0.0,)"),
    (["--std", "0.2,-0.1"], "--std", "(0.2, -0.1)"),
    (["--mean", "nan"], "--mean", "(nan,)"),
    (["--mean", "0.1,0.2"], "--mean", "(0.1, 0.2)"),  # Fashion-MNIST has 1 channel
    (["--in-chans", "3", "--std", "0.2,0.3"], "--std", "(0.2, 0.3)"),
    (["--label-smoothing", "1.5"], "--label-smoothing", "1.5"),
    (["--label-smoothing", "1"], "--label-smoothing", "1.0"),
    (["--label-smoothing", "-0.1"], "--label-smoothing", "-0.1"),
    (["--seed", "-1"], "--seed", "-1"),
    (["--seed", str(2**64)], "--seed", str(2**64)),
    (["--steps", "0"], "--steps", "0"),
    (["--steps", "-3"], "--steps", "-3"),
    (["--epochs", "-1"], "--epochs", "-1.0"),
    (["--epochs", "0"], "--epochs", "0.0"),
    (["--epochs", "-1", "--steps", "2"], "--epochs", "-1.0"),
    (["--epochs", "inf"], "--epochs", "inf"),
    (["--warmup", "2"], "--warmup", "2.0"),
    (["--warmup", "-0.1"], "--warmup", "-0.1"),
    (["--grad-clip", "-1"], "--grad-clip", "-1.0"),
    (["--weight-decay", "-1"], "--weight-decay", "-1.0"),
    (["--recon-weight", "-5"], "--recon-weight", "-5.0"),
    (["--lr", "0"], "--lr", "0.0"),
    (["--lr", "nan"], "--lr", "nan"),
    (["--workers", "-1"], "--workers", "-1"),
    (["--eval-every", "-1"], "--eval-every", "-1.0"),
    (["--save-every", "-2"], "--save-every", "-2.0"),
    (["--eval-subset", "0"], "--eval-subset", "0"),
    (["--eval-size", "-1"], "--eval-size", "-1"),
    (["--clutter", "-1"], "--clutter", "-1"),
    (["--depth", "0"], "--depth", "0"),
    (["--embed-dim", "-32"], "--embed-dim", "-32"),
    (["--num-heads", "0"], "--num-heads", "0"),
    (["--img-size", "0"], "--img-size", "0"),
    (["--patch", "0"], "--patch", "0"),
    (["--in-chans", "0"], "--in-chans", "0"),
    (["--glimpse", "0"], "--glimpse", "0"),
    (["--budget", "0"], "--budget", "0"),
    (["--train-k", "-1", "2"], "--train-k", "-1"),
    (["--train-t", "0"], "--train-t", "0"),
]


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the training data fails the test: a refusal must come before it."""

    def read(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("the training data was read before the configuration was checked")

    monkeypatch.setattr(avex.train.loop, "load_train_data", read)


@pytest.mark.parametrize(("argv", "flag", "shown"), BAD_FLAGS, ids=[" ".join(c[0]) for c in BAD_FLAGS])
def test_bad_numbers_are_refused_naming_the_flag_before_any_data_is_read(
    argv: list[str], flag: str, shown: str, tmp_path: Path, no_data: None
) -> None:
    out = tmp_path / "run" / "ck"
    argv = [*argv, "--device", "cpu", "--no-progress", "--out", str(out), "--log-json", str(tmp_path / "log.jsonl")]
    with pytest.raises(ValueError) as refused:
        avex.train.main(argv)
    message = str(refused.value)
    assert message.startswith(flag + " ") and shown in message, message
    assert list(tmp_path.iterdir()) == []  # no checkpoint, log or folder


# (flags, the start of the refusal): each failed inside timm or torch (a TypeError, an AssertionError, a RuntimeError
# on shapes or on the device string), after the data were read, or, for the outputs, after the training.
BAD_SETUPS = [
    (["--model", "resnet50"], "--model 'resnet50' with {'depth': 1, "),
    (["--model", "no_such_vit"], "--model must be a timm ViT name (see timm.list_models('vit*')), got 'no_such_vit'"),
    (["--embed-dim", "15"], "--model 'vit_tiny_patch16_224' with {'depth': 1, 'embed_dim': 15, 'num_heads': 2"),
    (["--img-size", "100"], "--img-size must be a multiple of --patch 8 (the canvas is cut into whole patches), got 1"),
    (["--device", "gpu"], "--device must be 'cpu', 'cuda' or 'cuda:<index>', got 'gpu'"),
    (["--out", "{tmp}/notes/ck"], "--out '{tmp}/notes/ck.safetensors': '{tmp}/notes' exists and is not a folder"),
    (["--log-json", "{tmp}/notes/log.jsonl"], "--log-json '{tmp}/notes/log.jsonl': '{tmp}/notes' exists and is not"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_SETUPS, ids=[" ".join(c[0]) for c in BAD_SETUPS])
def test_a_model_device_or_output_that_cannot_be_is_refused_before_any_data_is_read(
    argv: list[str], message: str, tmp_path: Path, no_data: None
) -> None:
    (tmp_path / "notes").write_text("a file")
    sizes = ["--depth", "1", "--embed-dim", "16", "--num-heads", "2", "--device", "cpu", "--no-progress"]
    argv = [*sizes, "--out", str(tmp_path / "run" / "ck"), *(a.replace("{tmp}", str(tmp_path)) for a in argv)]
    with pytest.raises(ValueError) as refused:
        avex.train.main(argv)
    assert str(refused.value).startswith(message.replace("{tmp}", str(tmp_path))), str(refused.value)
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]


def test_the_command_line_refuses_a_bad_number_in_one_line(
    tmp_path: Path, no_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from avex.cli import main as cli_main

    argv = ["train", "classifier", "--batch-size", "0", "--device", "cpu", "--out", str(tmp_path / "ck")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("avex train classifier: error: --batch-size ") and "got 0" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        (dict(batch_size=8.0), "--batch-size"),
        (dict(batch_size=True), "--batch-size"),
        (dict(steps=1.5), "--steps"),
        (dict(seed=-1), "--seed"),
        (dict(seed=0.5), "--seed"),
        (dict(workers=None), "--workers"),
        (dict(lr="1e-3"), "--lr"),
        (dict(warmup=float("nan")), "--warmup"),
        (dict(mean=()), "--mean"),
        (dict(std=(0.25, "x")), "--std"),
        (dict(train_k=()), "--train-k"),
        (dict(train_t=(1.5,)), "--train-t"),
    ],
)
def test_the_library_refuses_what_the_command_line_refuses(
    change: dict[str, Any], flag: str, tmp_path: Path, no_data: None
) -> None:
    """train_classifier(config), the Python API, makes the same checks (and some only a caller can get wrong)."""
    cfg = TrainConfig(device="cpu", progress=False, out=str(tmp_path / "ck"), **change)
    with pytest.raises(ValueError, match="^" + flag + " "):
        train_classifier(cfg)
    with pytest.raises(ValueError, match="^" + flag + " "):
        resolve_config(cfg)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(mean=(0.1, 0.2)), "--mean must be 1 finite number(s), one per channel (--in-chans 1), got (0.1, 0.2)"),
        (
            dict(dataset="folder", std=(0.2, 0.3)),
            "--std must be 3 finite number(s), one per channel (--in-chans 3), or one for every channel, each > 0 "
            "(pixels are divided by it), got (0.2, 0.3)",
        ),
        (dict(std=(float("inf"),)), "--std must be 1 finite number(s), one per channel (--in-chans 1), each > 0"),
    ],
)
def test_pixel_normalisation_is_checked_as_checkpoints_and_convert_check_it(
    change: dict[str, Any], message: str
) -> None:
    """avex.checks.check_pixel_norm: the rules and the message form of read_config and avex convert."""
    with pytest.raises(ValueError) as refused:
        resolve_config(TrainConfig(**change))
    assert str(refused.value).startswith(message), str(refused.value)


@pytest.mark.parametrize(
    "change",
    [
        dict(steps=None, epochs=0.01),  # --epochs alone: at least one step
        dict(steps=1, epochs=0.0),  # --steps overrides --epochs
        dict(warmup=0.0, label_smoothing=0.0, grad_clip=0.0, weight_decay=0.0, recon_weight=0.0),
        dict(warmup=1.0, label_smoothing=0.999, seed=2**64 - 1),
        dict(workers=0, eval_size=0, eval_every=0.0, save_every=0.0, clutter=0),
        dict(mean=(0.5,), std=(0.5,)),  # one value for the one channel
        dict(dataset="folder", mean=(0.5,), std=(0.25,)),  # one value for every channel
        dict(dataset="folder", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        dict(train_k=(0, 2), train_t=(1,)),
    ],
)
def test_edge_values_with_a_meaning_are_accepted(change: dict[str, Any]) -> None:
    cfg = resolve_config(TrainConfig(**change))
    assert all(getattr(cfg, k) == (tuple(v) if isinstance(v, list) else v) for k, v in change.items() if k != "dataset")


def test_the_shipped_checkpoints_recipe_still_resolves() -> None:
    from avex.checkpoint import shipped_checkpoint

    meta = json.loads(shipped_checkpoint("fashion-mnist").with_suffix(".json").read_text())["meta"]
    names = {f.name for f in fields(TrainConfig)}
    recipe = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["train_args"].items() if k in names}
    assert resolve_config(TrainConfig(**recipe)).mean == (0.1,)
