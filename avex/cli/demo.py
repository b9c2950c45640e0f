"""``avex demo``: one episode with an agent, printed step by step and written as a GIF."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, cast

import gymnasium as gym
import numpy as np

from agents import AGENTS, make_agent
from agents.evaluate import evaluation_split
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
    p.add_argument("--env-kwargs", default="{}", help="extra env kwargs as JSON (default: %(default)s)")
    p.add_argument("--gif", default="results/demo.gif", help="where the episode is written (default: %(default)s)")


def _render(env: gym.Env) -> np.ndarray:
    """``env.render()`` of an env made with ``render_mode="rgb_array"``: one uint8 [H', W', 3] frame."""
    frame = env.render()
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"render() returned {type(frame).__name__}, not an RGB frame: is render_mode='rgb_array'?")
    return frame


def main_from_args(args: argparse.Namespace) -> int:
    env_kwargs = json.loads(args.env_kwargs)
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
