"""Training a PPO glimpse policy on the batched vector env: ``avex train ppo``.

Discrete envs train sb3-contrib's ``MaskablePPO``, continuous (y, x, z) ones SB3's ``PPO``, both on the
belief keys only, and the ink map with ``--ink`` (:mod:`agents.sb3_policy`), with progress, a periodic greedy
evaluation on the data set's evaluation split (Fashion-MNIST: test) and a safetensors + JSON policy at the end.
The vec env is wrapped in ``VecMonitor``, so SB3 logs ``rollout/ep_rew_mean`` and ``ep_len_mean`` and
``model.ep_info_buffer`` fills.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.vec_env import VecMonitor

from agents.adapters import PolicyLike
from agents.belief import env_keys
from agents.evaluate import evaluate_accuracy, evaluation_split
from agents.ppo_config import PPOConfig
from agents.sb3_policy import POLICY_KWARGS, BeliefKeys, save_policy
from envs.sb3 import SB3VecEnv

if TYPE_CHECKING:  # sb3-contrib is imported only for discrete actions
    from sb3_contrib import MaskablePPO

__all__ = ["PPOConfig", "ProgressCallback", "evaluate_policy_accuracy", "train_ppo"]


class ProgressCallback(BaseCallback):
    """tqdm progress with episode accuracy and return (``ep_rew_mean``, from ``VecMonitor``), plus a periodic
    greedy evaluation."""

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
            episodes = list(self.model.ep_info_buffer or ())  # VecMonitor's episode infos, SB3's ep_rew_mean
            self.bar.set_postfix(
                train_acc=f"{np.mean(self._correct):.3f}",
                ep_rew_mean=f"{np.mean([e['r'] for e in episodes]):.3f}" if episodes else "-",
                fps=f"{self.num_timesteps / (time.perf_counter() - self.t0):.0f}",
            )
            self._correct.clear()
        if self.eval_fn and self.eval_every and self.num_timesteps >= self._next_eval:
            self._next_eval += self.eval_every
            acc = self.eval_fn(self.model.policy)
            seconds = time.perf_counter() - self.t0  # training time so far, evaluations included
            self.history.append(dict(step=self.num_timesteps, seconds=round(seconds, 1), accuracy=acc))
            self.bar.write(f"[eval] step {self.num_timesteps}: final-glimpse accuracy {acc:.4f}")
        if self.time_limit is not None and time.perf_counter() - self.t0 > self.time_limit:
            self.bar.write(
                f"[ppo] time limit of {self.time_limit:.0f} s reached at step {self.num_timesteps}: stopping"
            )
            return False  # SB3 ends learn() cleanly; the policy is still saved
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


def train_ppo(cfg: PPOConfig) -> tuple[Any, dict[str, Any]]:
    """Train a glimpse policy on the batched vector env; return (the SB3 model, a summary dict).

    Discrete envs train MaskablePPO, continuous ones PPO. ``time_limit`` (seconds) stops training early,
    cleanly, with the policy still evaluated and saved.

    Raises:
        ValueError, FileNotFoundError: a bad setting (:meth:`PPOConfig.check`), before any env is built or file
            written; an ``init`` policy that does not fit the env, before training.
    """
    cfg.check()
    env_kwargs = cfg.make_env_kwargs()
    # VecMonitor sits right on the env, under any wrapper that could change rewards (SB3's rule: before
    # VecNormalize); BeliefKeys only drops observation keys.
    # The policy reads the belief keys only (and the canvas its ink map pools): without it, the envs never compose
    # or copy the revealed canvas.
    obs_kwargs = {"obs_keys": env_keys(cfg.ink), **env_kwargs}
    vec = gym.make_vec(cfg.env_id, num_envs=cfg.num_envs, **obs_kwargs)
    venv = BeliefKeys(VecMonitor(SB3VecEnv(vec)), ink=cfg.ink)
    venv.seed(cfg.seed)
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
        n_steps=cfg.n_steps,
        batch_size=cfg.batch_size,
        n_epochs=cfg.n_epochs,
        learning_rate=cfg.learning_rate,
        ent_coef=cfg.ent_coef,
        gamma=cfg.gamma,
        gae_lambda=0.95,
        policy_kwargs=POLICY_KWARGS,  # the ink map, when on, is in the observation space the extractor reads
        seed=cfg.seed,
        device=cfg.device,
        verbose=0,
    )
    if cfg.init is not None:  # a warm start: the weights only (policy and value heads), a fresh optimiser
        from agents.ppo import PPOAgent

        try:
            warm = PPOAgent.load(cfg.init, venv, device=cfg.device)
        except (ValueError, FileNotFoundError) as err:
            venv.close()
            raise type(err)(f"--init {cfg.init!r}: {err}") from err
        model.policy.load_state_dict(warm.policy.state_dict())
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default would create a /tmp/SB3-* folder per run

    # The data set's evaluation split (Fashion-MNIST: test; image folders and ImageNet: val, they have no test).
    eval_kwargs = dict(obs_kwargs, split=evaluation_split(cfg.env_id, env_kwargs))

    def evaluate(policy: BasePolicy) -> float:
        acc = evaluate_accuracy(policy, cfg.env_id, cfg.eval_episodes, cfg.num_envs, cfg.seed + 10_000, **eval_kwargs)
        policy.train()
        return acc.final

    callback = ProgressCallback(cfg.total_steps, evaluate if cfg.eval_every else None, cfg.eval_every, cfg.time_limit)
    t0 = time.perf_counter()
    model.learn(cfg.total_steps, callback=callback)
    seconds = time.perf_counter() - t0
    summary = dict(
        asdict(cfg),
        env_kwargs=env_kwargs,
        continuous=continuous,
        num_actions=int(getattr(venv.action_space, "n", 0)),
        trained_steps=int(model.num_timesteps),
        ep_rew_mean=float(np.mean([e["r"] for e in model.ep_info_buffer])) if model.ep_info_buffer else None,
        train_seconds=round(seconds, 1),
        eval_history=callback.history,
        final_test_accuracy=evaluate(model.policy),
    )
    if cfg.out is not None:
        save_policy(model.policy, cfg.out, summary)
    venv.close()
    return model, summary


def evaluate_policy_accuracy(
    agent: PolicyLike, env_id: str, episodes: int, num_envs: int, seed: int, env_kwargs: dict[str, Any]
) -> float:
    """Final-glimpse accuracy of a policy over ``episodes`` episodes of the vector env: the last glimpse of
    :func:`agents.evaluate.evaluate_accuracy`, which gives every glimpse with intervals."""
    return evaluate_accuracy(agent, env_id, episodes, num_envs, seed, **env_kwargs).final
