"""Where does AME's attention entropy point on AVE-FashionMNIST-v0? A probe of the entropy agent's premise.

For N test canvases it compares the mean entropy of unseen patches that hold ink (any non-zero pixel:
the object or clutter) with unseen empty patches, and how often AME's chosen 2x2 glimpse touches ink,
before any glimpse and after 4 random ones.

    python benchmarks/entropy_probe.py [--envs 200] [--K 3]
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

from agents import RandomAgent, ame_scores


def ink_patches(env) -> np.ndarray:
    """bool [N, gh, gw]: the patches of each env's hidden canvas holding any non-zero pixel (object or clutter)."""
    geo = env.geometry
    (gh, gw), p = geo.grid, geo.patch
    hidden = env.engine.hidden.cpu().numpy()[..., 0]
    return hidden.reshape(hidden.shape[0], gh, p, gw, p).max(axis=(2, 4)) > 0


def touches_ink(ink: np.ndarray, geo, actions: np.ndarray) -> float:
    """The share of envs whose g x g glimpse at ``actions`` ([N] discrete positions) covers an ink patch."""
    rows, cols, g = *geo.action_to_patch(actions), geo.glimpse
    return float(np.mean([ink[i, rows[i] : rows[i] + g, cols[i] : cols[i] + g].any() for i in range(len(ink))]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", type=int, default=200)
    p.add_argument("--K", type=int, default=None)
    args = p.parse_args()
    venv = gym.make_vec(
        "AVE-FashionMNIST-v0", num_envs=args.envs, split="test", **({} if args.K is None else {"K": args.K})
    )
    env = venv.unwrapped
    geo, n = env.geometry, args.envs
    (gh, gw), g = geo.grid, geo.glimpse
    obs, _ = venv.reset(seed=0)
    agent = RandomAgent(0)
    for t in range(5):
        if t in (0, 4):
            ink = ink_patches(env)
            unseen = obs["visited"] == 0
            ent = obs["entropy"]
            pick = np.where(env.action_masks(), ame_scores(ent, obs["visited"], g, geo.stride), -np.inf).argmax(1)
            hit = touches_ink(ink, geo, pick)
            windows = np.mean(
                [
                    [ink[i, r : r + g, c : c + g].any() for r in range(gh - g + 1) for c in range(gw - g + 1)]
                    for i in range(n)
                ]
            )
            print(
                f"after {t} glimpses (K={env.K}): unseen patches with ink {ent[ink & unseen].mean():.2f} bits, empty "
                f"{ent[~ink & unseen].mean():.2f} bits; AME's glimpse touches ink in {100 * hit:.0f}% of canvases "
                f"(a uniformly random position: {100 * windows:.0f}%)"
            )
        obs, *_ = venv.step(agent.act(obs, env.action_masks()))


if __name__ == "__main__":
    main()
