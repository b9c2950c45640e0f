"""``avex demo``: one episode with an agent, printed step by step and written as a GIF."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import gymnasium as gym
import numpy as np

from agents import AGENTS, make_agent
from agents.evaluate import evaluation_split
from agents.ppo import policy_file
from avex import options
from avex.checks import brief, check_int, check_writable
from envs.registration import check_env_id, check_env_kwargs
from envs.render import save_gif

if TYPE_CHECKING:
    from envs.ave_env import AVEEnv

__all__ = ["add_arguments", "main_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="AVE-FashionMNIST-v0", help="environment id (default: %(default)s)")
    p.add_argument(
        "--agent", default="random", choices=AGENTS.names(), help="a registered agent (default: %(default)s)"
    )
    p.add_argument("--ppo", default=None, help="policy of the ppo agent (default: the shipped Fashion-MNIST one)")
    p.add_argument(
        "--split", default=None, help="split the canvas comes from (default: the data set's evaluation split)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the env and the agent (default: %(default)s)")
    p.add_argument(
        "--env-kwargs",
        type=options.json_object,
        default="{}",
        help="extra env kwargs as a JSON object (default: %(default)s)",
    )
    p.add_argument("--gif", default="results/demo.gif", help="where the episode is written (default: %(default)s)")


def _render(env: gym.Env) -> np.ndarray:
    """``env.render()`` of an env made with ``render_mode="rgb_array"``: one uint8 [H', W', 3] frame."""
    frame = env.render()
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"render() returned {type(frame).__name__}, not an RGB frame: is render_mode='rgb_array'?")
    return frame


# env_kwargs that demo sets itself, with the flag to use instead.
_OWN_ENV_KWARGS = {"split": "pass it as --split", "render_mode": "leave it out: the GIF needs 'rgb_array' frames"}


def _check_gif(gif: Any) -> None:
    """Refuse a ``--gif`` that is not a .gif file path whose folder can be made, before the episode is played."""
    if not isinstance(gif, str) or Path(gif).suffix.lower() != ".gif":
        raise ValueError(f"--gif must be a path ending in .gif, such as 'results/demo.gif', got {brief(gif)}")
    check_writable("--gif", gif)


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every argument that can be checked before an env is built or a file written; returns the env kwargs."""
    check_env_id(args.env, "--env")
    check_int("--seed", args.seed, 0)
    env_kwargs = check_env_kwargs(args.env_kwargs, _OWN_ENV_KWARGS)
    if args.ppo is not None:  # checked whichever the agent, as avex benchmark does
        policy_file(args.ppo, "--ppo")
    _check_gif(args.gif)
    return env_kwargs


def main_from_args(args: argparse.Namespace) -> int:
    env_kwargs = _check_args(args)
    split = evaluation_split(args.env, env_kwargs) if args.split is None else args.split
    env = gym.make(args.env, split=split, render_mode="rgb_array", **env_kwargs)
    agent = make_agent(args.agent, env, seed=args.seed, policy=args.ppo)
    obs, info = env.reset(seed=args.seed)
    ave = cast("AVEEnv", env.unwrapped)
    names = ave.class_names
    frames = [_render(env)]
    print(f"{args.env}: true class {names[info['label']]!r}; agent {args.agent}")
    done, t = False, 0
    while not done:
        action = agent.act_single(obs, ave.action_masks())
        obs, reward, terminated, truncated, info = env.step(action)
        t += 1
        done = terminated or truncated
        frames.append(_render(env))
        print(
            f"glimpse {t:2d} at {info['glimpse_box'].tolist()}: predicts {names[info['prediction']]!r} "
            f"({'right' if info['correct'] else 'wrong'}), reward {reward:+.3f}, "
            f"{info['cumulative_flops'] / 1e6:.1f} MFLOPs so far"
        )
    save_gif(frames, args.gif, fps=env.metadata.get("render_fps", 2))
    print(f"episode written to {args.gif}")
    return 0
