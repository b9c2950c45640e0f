"""Training a PPO glimpse policy on the batched vector env: ``avex train ppo``.

Discrete envs train sb3-contrib's ``MaskablePPO``, continuous (y, x, z) ones SB3's ``PPO``, both on the
belief keys only (:mod:`agents.sb3_policy`), with progress, a periodic greedy evaluation on the test
split and a safetensors + JSON policy at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import BasePolicy

from agents.base import GlimpseAgent
from agents.evaluate import play_episodes
from agents.ppo import PPOAgent
from agents.sb3_policy import POLICY_KWARGS, BeliefKeys, save_policy
from envs.sb3 import SB3VecEnv

if TYPE_CHECKING:  # sb3-contrib is imported only for discrete actions
    from sb3_contrib import MaskablePPO

__all__ = ["ProgressCallback", "evaluate_policy_accuracy", "train_ppo"]


class ProgressCallback(BaseCallback):
    """tqdm progress with episode accuracy, plus a periodic greedy evaluation."""

    def __init__(
        self,
        total: int,
        eval_fn: Callable[[BasePolicy], float] | None = None,
        eval_every: int = 0,
        time_limit: float | None = None,
    ) -> None:
        super().__init__()
        self.total, self.eval_fn, self.eval_every, self.time_limit = total, eval_fn, eval_every, time_limit
        self.history: list[dict[str, float]] = []
        self._next_eval = eval_every
        self._correct: list[float] = []

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="ppo", unit="step", dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def _on_step(self) -> bool:
        n = self.training_env.num_envs
        self.bar.update(n)
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if done and "correct" in info:
                self._correct.append(float(info["correct"]))
        if len(self._correct) >= 200:
            self.bar.set_postfix(
                train_acc=f"{np.mean(self._correct):.3f}",
                fps=f"{self.num_timesteps / (time.perf_counter() - self.t0):.0f}",
            )
            self._correct.clear()
        if self.eval_fn and self.eval_every and self.num_timesteps >= self._next_eval:
            self._next_eval += self.eval_every
            acc = self.eval_fn(self.model.policy)
            self.history.append(dict(step=self.num_timesteps, accuracy=acc))
            self.bar.write(f"[eval] step {self.num_timesteps}: final-glimpse accuracy {acc:.4f}")
        if self.time_limit is not None and time.perf_counter() - self.t0 > self.time_limit:
            self.bar.write(
                f"[ppo] time limit of {self.time_limit:.0f} s reached at step {self.num_timesteps}: stopping"
            )
            return False  # SB3 ends learn() cleanly; the policy is still saved
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


def train_ppo(
    env_id: str = "AVE-FashionMNIST-v0",
    *,
    num_envs: int = 64,
    total_steps: int = 200_000,
    n_steps: int = 48,
    batch_size: int = 1024,
    n_epochs: int = 4,
    learning_rate: float = 3e-4,
    ent_coef: float = 0.01,
    gamma: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    eval_every: int = 0,
    eval_episodes: int = 512,
    out: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
    time_limit: float | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train a glimpse policy on the batched vector env; return (the SB3 model, a summary dict).

    Discrete envs train MaskablePPO, continuous ones PPO. ``gamma=1``: the dense reward telescopes to
    L_0 - L_T, so the undiscounted return is exactly the final loss drop. ``time_limit`` (seconds) stops
    training early, cleanly, with the policy still evaluated and saved.
    """

    env_kwargs = dict(env_kwargs or {})
    env_kwargs.setdefault("device", device)
    venv = BeliefKeys(SB3VecEnv(gym.make_vec(env_id, num_envs=num_envs, **env_kwargs)))
    venv.seed(seed)
    continuous = isinstance(venv.action_space, spaces.Box)
    algo: type[PPO] | type[MaskablePPO]
    if continuous:
        algo = PPO
    else:
        import sb3_contrib

        algo = sb3_contrib.MaskablePPO
    model = algo(
        "MultiInputPolicy",
        venv,
        n_steps=n_steps,
        batch_size=batch_size,
        n_epochs=n_epochs,
        learning_rate=learning_rate,
        ent_coef=ent_coef,
        gamma=gamma,
        gae_lambda=0.95,
        policy_kwargs=POLICY_KWARGS,
        seed=seed,
        device=device,
        verbose=0,
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default would create a /tmp/SB3-* folder per run

    eval_kwargs = dict(env_kwargs, split="test")

    def evaluate(policy: BasePolicy) -> float:
        acc = evaluate_policy_accuracy(
            PPOAgent(policy, continuous),
            env_id,
            eval_episodes,
            min(num_envs, eval_episodes),
            seed + 10_000,
            eval_kwargs,
        )
        policy.train()
        return acc

    callback = ProgressCallback(total_steps, evaluate if eval_every else None, eval_every, time_limit)
    t0 = time.perf_counter()
    model.learn(total_steps, callback=callback)
    seconds = time.perf_counter() - t0
    final = evaluate(model.policy)
    summary = dict(
        env_id=env_id,
        env_kwargs=env_kwargs,
        continuous=continuous,
        num_actions=int(getattr(venv.action_space, "n", 0)),
        total_steps=total_steps,
        trained_steps=int(model.num_timesteps),
        num_envs=num_envs,
        n_steps=n_steps,
        batch_size=batch_size,
        n_epochs=n_epochs,
        learning_rate=learning_rate,
        ent_coef=ent_coef,
        gamma=gamma,
        seed=seed,
        device=device,
        train_seconds=round(seconds, 1),
        eval_history=callback.history,
        final_test_accuracy=final,
        eval_episodes=eval_episodes,
    )
    if out is not None:
        save_policy(model.policy, out, summary)
    venv.close()
    return model, summary


def evaluate_policy_accuracy(
    agent: GlimpseAgent, env_id: str, episodes: int, num_envs: int, seed: int, env_kwargs: dict[str, Any]
) -> float:
    """Final-glimpse accuracy of an agent over ``episodes`` episodes of the vector env."""
    venv = gym.make_vec(env_id, num_envs=num_envs, **env_kwargs)
    correct = play_episodes(venv, agent, episodes, seed).correct
    venv.close()
    return float(correct[:, -1].mean())
