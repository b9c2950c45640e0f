"""Play whole episodes of an agent on the batched vector env: the one evaluation loop, and the public
accuracy-per-glimpse evaluation built on it.

:func:`evaluate_accuracy` takes any policy (a :class:`GlimpseAgent`, a stable-baselines3 model or
policy, or a function; :func:`agents.adapters.as_agent`) and reports the accuracy after every glimpse
with 95% Wilson intervals. ``avex benchmark`` (which adds FLOPs and timings) and PPO training's periodic
evaluation use the same loop, :func:`play_episodes`, and the same intervals, :func:`wilson`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from agents.adapters import PolicyLike, as_agent
from agents.base import GlimpseAgent
from avex.checks import check_int
from avex.data import get_dataset
from envs.registration import check_env_id

__all__ = [
    "AccuracyReport",
    "EpisodeStats",
    "check_whole_episodes",
    "evaluate_accuracy",
    "evaluation_split",
    "play_episodes",
    "wilson",
]


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


def wilson(correct: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy and 95% Wilson interval per column of a {0,1} [episodes, steps] array."""
    n = correct.shape[0]
    p = correct.mean(axis=0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At p = 0 or 1 the bound is exactly 0 or 1 but rounds to -3e-17 or 1 + 2e-16.
    return p, np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def check_whole_episodes(env_kwargs: dict[str, Any], reader: str) -> None:
    """Refuse env kwargs under which episodes would not all end at the budget and restart in the same step
    (``max_episode_steps``, ``autoreset_mode`` other than same-step): :func:`play_episodes` plays whole rounds.

    Raises:
        ValueError: naming ``reader``, the kwarg and its value.
    """
    mode = env_kwargs.get("autoreset_mode")
    same_step = mode is None or str(getattr(mode, "name", mode)).lower() == "same_step"
    steps = env_kwargs.get("max_episode_steps")
    for key, value, fits in (("autoreset_mode", mode, same_step), ("max_episode_steps", steps, steps is None)):
        if not fits:
            raise ValueError(
                f"{reader} plays whole episodes that end together at the budget, restarting in the same step: "
                f"leave {key} out (got {key}={value!r})"
            )


def evaluation_split(env_id: str, env_kwargs: dict[str, Any]) -> str | None:
    """The split an evaluation plays by default: the env's data set's evaluation split (Fashion-MNIST: test)."""
    dataset = env_kwargs.get("dataset", gym.spec(env_id).kwargs.get("dataset", "fashion-mnist"))
    return get_dataset(dataset).eval_split


@dataclass(frozen=True)
class AccuracyReport:
    """What :func:`evaluate_accuracy` measured.

    Attributes:
        accuracy: float [budget], the fraction of episodes predicted right after glimpse 1..budget.
        ci_low, ci_high: float [budget], the 95% Wilson interval of each.
        correct: bool [episodes, budget], prediction right after each glimpse (for paired comparisons).
        env_id, split: where the episodes came from.
        episode_flops: analytic FLOPs of one episode.
    """

    accuracy: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    correct: np.ndarray
    env_id: str
    split: str | None
    episode_flops: float

    @property
    def episodes(self) -> int:
        return int(self.correct.shape[0])

    @property
    def final(self) -> float:
        """Accuracy after the last glimpse."""
        return float(self.accuracy[-1])

    def __str__(self) -> str:
        rows = [f"{self.env_id} ({self.split} split), {self.episodes} episodes: accuracy (95% interval)"]
        rows += [
            f"  glimpse {t + 1:>2}: {100 * a:5.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"
            for t, (a, lo, hi) in enumerate(zip(self.accuracy, self.ci_low, self.ci_high))
        ]
        return "\n".join(rows)


def evaluate_accuracy(
    policy: PolicyLike,
    env_id: str = "AVE-FashionMNIST-v0",
    episodes: int = 500,
    num_envs: int = 250,
    seed: int = 0,
    **env_kwargs: Any,
) -> AccuracyReport:
    """Accuracy after every glimpse of any glimpse policy, with 95% Wilson intervals.

    Args:
        policy: a :class:`GlimpseAgent`; a stable-baselines3 model or policy (anything with
            ``predict(obs, deterministic=True)``; it gets the observation keys of its own observation space,
            e.g. the belief keys of :class:`agents.belief.BeliefObservation`, and the action masks when it
            takes them, as sb3-contrib's maskable ones do); or a function ``(obs, action_mask) -> actions``
            on batches. See :func:`agents.adapters.as_agent`.
        env_id: the environment; ``env_kwargs`` go to ``gym.make_vec`` (``split`` defaults to the data
            set's evaluation split, not the env's default).
        episodes: episodes played, in rounds of ``min(num_envs, episodes)`` envs stepped together.
        seed: seeds the envs (the same seed gives every policy the same canvases) and re-seeds an agent's
            own randomness (``agent.reset(seed)``).

    Raises:
        ValueError: a bad count or seed, an env that is not avex's or whose episodes would not end together at
            the budget (``autoreset_mode``, ``max_episode_steps``), a policy of none of these kinds, or one that
            does not fit the env. The agent is re-seeded only once all of that has been checked.
    """
    check_int("episodes", episodes, 1)
    check_int("num_envs", num_envs, 1)
    check_int("seed", seed, 0)
    check_env_id(env_id)
    check_whole_episodes(env_kwargs, "evaluate_accuracy")
    agent = as_agent(policy)
    if env_kwargs.get("split") is None:
        env_kwargs["split"] = evaluation_split(env_id, env_kwargs)
    venv = gym.make_vec(env_id, num_envs=min(num_envs, episodes), **env_kwargs)
    try:
        agent.reset(seed)  # after everything that can refuse the call: a refused call leaves the agent as it was
        stats = play_episodes(venv, agent, episodes, seed)
    finally:
        venv.close()
    acc, lo, hi = wilson(stats.correct.astype(np.float64))
    return AccuracyReport(acc, lo, hi, stats.correct, env_id, env_kwargs["split"], stats.episode_flops)
