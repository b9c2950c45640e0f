"""``avex train ppo``: a glimpse policy trained on the batched vector env (MaskablePPO, or PPO for
continuous (y, x, z) glimpses), with progress, periodic greedy evaluation on the data set's evaluation split
and a safetensors + JSON policy at the end. The options are :class:`agents.ppo_train.PPOConfig`'s fields."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from agents.ppo_config import PPOConfig
from avex import options

__all__ = ["add_arguments", "main_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, PPOConfig)


def main_from_args(args: argparse.Namespace) -> int:
    from agents.ppo_train import train_ppo

    cfg = options.from_args(PPOConfig, args)
    if cfg.out == "none":  # the help's "(none: no file)": a command line has no other way to give None
        cfg = replace(cfg, out=None)
    _, summary = train_ppo(cfg)
    # The file save_policy wrote: the stem's suffix, if any, is replaced.
    written = (
        "no file written (--out none)"
        if cfg.out is None
        else f"policy written to {Path(cfg.out).with_suffix('.safetensors')}"
    )
    print(
        f"final greedy accuracy on the evaluation split ({summary['eval_episodes']} episodes): "
        f"{summary['final_test_accuracy']:.4f}; trained in {summary['train_seconds']} s; {written}"
    )
    return 0
