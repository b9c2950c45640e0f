"""The ``avex`` command line: ``avex data``, ``avex train classifier|ppo``, ``avex benchmark``, ``avex demo``,
``avex convert``, ``avex docs``.

With the ``import avex`` facade, this package is the top layer: the only part of ``avex`` that imports
``envs`` and ``agents`` (the CLI drives them). Each subcommand module gives ``add_arguments(parser)``
and ``main_from_args(args)``.
"""

from __future__ import annotations

import argparse
import os
import sys

import gymnasium

from avex import train as train_mod
from avex.cli import benchmark as bench_cli
from avex.cli import convert as convert_cli
from avex.cli import data as data_cli
from avex.cli import demo as demo_cli
from avex.cli import docs as docs_cli
from avex.cli import ppo as ppo_cli

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avex", description="Active Visual Exploration on a TORE-backed ViT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="install Fashion-MNIST, or prepare an image folder's store (fast resets)")
    data_cli.add_arguments(p)
    p.set_defaults(func=data_cli.main_from_args)

    train = sub.add_parser("train", help="train the TORE classifier or a PPO glimpse policy")
    tsub = train.add_subparsers(dest="what", required=True)
    for parent, name, module, text in (
        (tsub, "classifier", train_mod, "TORE training policy (random K per batch, random glimpses)"),
        (tsub, "ppo", ppo_cli, "MaskablePPO glimpse policy on the batched vector env"),
        (sub, "benchmark", bench_cli, "agents x K on an env: accuracy per glimpse, FLOPs, time (the main job)"),
        (sub, "demo", demo_cli, "one episode with an agent; prints each step and writes a GIF"),
        (sub, "convert", convert_cli, "a MAE / AME / TORE PyTorch checkpoint -> an avex checkpoint"),
        (sub, "docs", docs_cli, "the documentation site from the code: pages in build/docs, mkdocs build --strict"),
    ):
        p = parent.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.main_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``avex`` command. A bad value or a missing file ends it with one line on stderr and exit
    status 2, as argparse does for a bad flag (``AVEX_TRACEBACK=1`` shows the whole traceback instead)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    # avex's own refusals name the problem and the fix; Gymnasium's name an unknown env id.
    except (ValueError, FileNotFoundError, gymnasium.error.Error) as err:
        if os.environ.get("AVEX_TRACEBACK"):
            raise
        name = " ".join(str(v) for v in (args.command, getattr(args, "what", None)) if v)
        print(f"avex {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
