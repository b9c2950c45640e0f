"""Play whole episodes of an agent on the batched vector env: the one evaluation loop.

Used by ``avex benchmark`` (accuracy after every glimpse, FLOPs, timings) and by PPO training's
periodic evaluation (accuracy after the last glimpse).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.base import GlimpseAgent

__all__ = ["EpisodeStats", "play_episodes"]


@dataclass
class EpisodeStats:
    """What :func:`play_episodes` measured.

    Attributes:
        correct: bool [episodes, budget], prediction right after each glimpse.
        episode_flops: analytic FLOPs of one episode (the env's ``cumulative_flops`` at its end).
        ms_per_step: wall time of one batched env step.
        agent_ms_per_step: wall time of one batched agent decision.
    """

    correct: np.ndarray
    episode_flops: float
    ms_per_step: float
    agent_ms_per_step: float


def play_episodes(
    venv: Any, agent: GlimpseAgent, episodes: int, seed: int, on_round: Callable[[int], None] | None = None
) -> EpisodeStats:
    """Play at least ``episodes`` episodes in rounds of ``num_envs`` (all envs start and end together:
    fixed budget, same-step autoreset); return the first ``episodes``.

    Args:
        venv: an avex vector env (``gym.make_vec``), not yet reset; it is reset with ``seed``.
        on_round: called with ``num_envs`` after each round (progress bars).
    """
    env = venv.unwrapped
    n, budget = env.num_envs, env.budget
    obs, _ = venv.reset(seed=seed)
    rounds: list[np.ndarray] = []
    flops = 0.0
    step_time = agent_time = 0.0
    while len(rounds) * n < episodes:
        current = np.zeros((n, budget), dtype=bool)
        for t in range(budget):
            t0 = time.perf_counter()
            action = agent.act(obs, env.action_masks())
            t1 = time.perf_counter()
            obs, _, terminated, _, info = venv.step(action)
            agent_time += t1 - t0
            step_time += time.perf_counter() - t1
            last = t == budget - 1
            if last and not terminated.all():
                raise RuntimeError("episodes did not end together at the budget")
            step_info = info["final_info"] if last else info
            current[:, t] = step_info["correct"]
            if last:
                flops = float(np.asarray(step_info["cumulative_flops"], dtype=np.float64)[0])
        rounds.append(current)
        if on_round is not None:
            on_round(n)
    steps = len(rounds) * budget
    return EpisodeStats(np.concatenate(rounds)[:episodes], flops, 1e3 * step_time / steps, 1e3 * agent_time / steps)
