"""PPO glimpse policies (stable-baselines3 / sb3-contrib) on the environment's belief.

The policy never looks at pixels: it reads what the TORE model already computed for the env - class
probabilities, the aggregator's CLS embedding, the AME entropy map, the visited patches and the step.
Discrete mode trains sb3-contrib's ``MaskablePPO`` (repeats are masked); continuous (y, x, z) mode
trains plain ``PPO``. Policies are saved as safetensors + JSON (no pickle) and rebuilt from the env's
spaces when loaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from gymnasium import spaces
from safetensors.torch import load_model, save_model
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from agents.base import GlimpseAgent
from avex.checkpoint import shipped_file

__all__ = ["BELIEF_KEYS", "BeliefExtractor", "BeliefKeys", "PPOAgent", "save_policy", "shipped_policy"]

# What the policy reads; the revealed canvas is left out (the CLS embedding already summarises it, and
# storing canvases in the rollout buffer as float32 would cost gigabytes).
BELIEF_KEYS = ("probs", "cls", "entropy", "visited", "step")
FORMAT = "avex-ppo/1"
SHIPPED = {"fashion-mnist": "fashion_mnist_ppo"}


def shipped_policy(name: str) -> Path:
    """Path of a PPO policy shipped in ``avex/checkpoints``."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped PPO policy named {name!r}; available: {sorted(SHIPPED)}")
    path = shipped_file(SHIPPED[name])
    if not path.exists():
        raise FileNotFoundError(
            f"the shipped PPO policy {path} is missing: train one with `avex train ppo` and pass its path"
        )
    return path


def belief_space(space: spaces.Dict) -> spaces.Dict:
    """The observation space restricted to :data:`BELIEF_KEYS`."""
    missing = [k for k in BELIEF_KEYS if k not in space.spaces]
    if missing:
        raise ValueError(f"the env's observation lacks {missing}: PPO needs {BELIEF_KEYS}")
    return spaces.Dict({k: space[k] for k in BELIEF_KEYS})


class BeliefKeys(VecEnvWrapper):
    """SB3 VecEnv wrapper that passes on only :data:`BELIEF_KEYS` of the Dict observation."""

    def __init__(self, venv: VecEnv) -> None:
        super().__init__(venv, observation_space=belief_space(venv.observation_space))

    def _filter(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: obs[k] for k in BELIEF_KEYS}

    def reset(self) -> dict[str, np.ndarray]:
        return self._filter(self.venv.reset())

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            if "terminal_observation" in info:
                info["terminal_observation"] = self._filter(info["terminal_observation"])
        return self._filter(obs), rewards, dones, infos

    def action_masks(self) -> np.ndarray:
        return np.stack(self.venv.env_method("action_masks"))


class BeliefExtractor(BaseFeaturesExtractor):
    """Features from the belief: a small CNN over [unseen entropy, visited] maps and an MLP over
    [probabilities, normalised CLS embedding, step]. Output [B, features_dim]."""

    def __init__(self, observation_space: spaces.Dict, features_dim: int = 256) -> None:
        super().__init__(observation_space, features_dim)
        gh, gw = observation_space["entropy"].shape
        n_vec = sum(int(np.prod(observation_space[k].shape)) for k in ("probs", "cls", "step"))
        self.cls_norm = nn.LayerNorm(observation_space["cls"].shape[0])
        self.maps = nn.Sequential(
            nn.Conv2d(2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * gh * gw, 128),
            nn.ReLU(),
        )
        self.vec = nn.Sequential(nn.Linear(n_vec, 128), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(256, features_dim), nn.ReLU())
        self.budget = (
            float(observation_space["step"].high.max()) if isinstance(observation_space["step"], spaces.Box) else 1.0
        )

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        visited = obs["visited"].float()
        ent = obs["entropy"].float() * (1 - visited)
        ent = ent / ent.flatten(1).amax(dim=1).clamp(min=1e-6)[:, None, None]
        maps = self.maps(torch.stack([ent, visited], dim=1))
        vec = torch.cat(
            [obs["probs"].float(), self.cls_norm(obs["cls"].float()), obs["step"].float().flatten(1) / self.budget],
            dim=1,
        )
        return self.out(torch.cat([maps, self.vec(vec)], dim=1))


POLICY_KWARGS = dict(
    features_extractor_class=BeliefExtractor,
    features_extractor_kwargs=dict(features_dim=256),
    net_arch=dict(pi=[256], vf=[256]),
)


def _policy_class(continuous: bool):
    if continuous:
        from stable_baselines3.common.policies import MultiInputActorCriticPolicy

        return MultiInputActorCriticPolicy
    from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy

    return MaskableMultiInputActorCriticPolicy


def save_policy(policy: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` (policy weights) and ``path.json`` (what rebuilds it)."""
    weights = Path(path).with_suffix(".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_model(policy, str(weights))  # handles the feature extractor shared by actor and critic
    weights.with_suffix(".json").write_text(json.dumps(dict(format=FORMAT, **meta), indent=2, default=str))
    return weights


class PPOAgent(GlimpseAgent):
    """A trained PPO policy acting deterministically (mode of its action distribution)."""

    name = "ppo"

    def __init__(self, policy: nn.Module, continuous: bool, meta: dict[str, Any] | None = None) -> None:
        self.policy = policy.eval()
        self.continuous = continuous
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path, env: Any, device: str = "cpu") -> PPOAgent:
        """Rebuild a saved policy for an env (single or vector) whose spaces it must fit.

        Args:
            path: ``.safetensors`` with its ``.json``, or ``"shipped:fashion-mnist"``.
        """
        path = (
            shipped_policy(str(path).split(":", 1)[1])
            if str(path).startswith("shipped:")
            else Path(path).with_suffix(".safetensors")
        )
        if not path.exists():
            raise FileNotFoundError(f"PPO policy not found: {path}")
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path.with_suffix('.json')} is not an avex PPO policy (format {meta.get('format')!r}, expected {FORMAT!r})"
            )
        u = env.unwrapped if hasattr(env, "unwrapped") else env
        obs_space = getattr(u, "single_observation_space", u.observation_space)
        act_space = getattr(u, "single_action_space", u.action_space)
        continuous = isinstance(act_space, spaces.Box)
        if continuous != meta["continuous"]:
            raise ValueError(
                f"policy {path} was trained for {'continuous' if meta['continuous'] else 'discrete'} actions; this env's are {act_space}"
            )
        policy = _policy_class(continuous)(belief_space(obs_space), act_space, lambda _: 0.0, **POLICY_KWARGS)
        try:
            load_model(policy, str(path), strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"policy {path} does not fit this env's spaces (trained on {meta.get('env_id')} "
                f"with {meta.get('num_actions')} actions; this env has {getattr(act_space, 'n', act_space)}): {err}"
            ) from err
        return cls(policy.to(device), continuous, meta)

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], action_mask: np.ndarray) -> np.ndarray:
        belief = {k: obs[k] for k in BELIEF_KEYS}
        if self.continuous:
            actions, _ = self.policy.predict(belief, deterministic=True)
            return np.clip(actions, 0.0, 1.0).astype(np.float32)
        actions, _ = self.policy.predict(belief, deterministic=True, action_masks=np.asarray(action_mask, dtype=bool))
        return np.asarray(actions, dtype=np.int64)


class ProgressCallback(BaseCallback):
    """tqdm progress with episode accuracy, plus a periodic greedy evaluation."""

    def __init__(self, total: int, eval_fn=None, eval_every: int = 0, time_limit: float | None = None) -> None:
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
    from envs.sb3 import SB3VecEnv

    env_kwargs = dict(env_kwargs or {})
    env_kwargs.setdefault("device", device)
    venv = BeliefKeys(SB3VecEnv(gym.make_vec(env_id, num_envs=num_envs, **env_kwargs)))
    venv.seed(seed)
    continuous = isinstance(venv.action_space, spaces.Box)
    if continuous:
        from stable_baselines3 import PPO as Algo
    else:
        from sb3_contrib import MaskablePPO as Algo
    model = Algo(
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

    def evaluate(policy: nn.Module) -> float:
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
    from agents.evaluate import play_episodes

    venv = gym.make_vec(env_id, num_envs=num_envs, **env_kwargs)
    correct = play_episodes(venv, agent, episodes, seed).correct
    venv.close()
    return float(correct[:, -1].mean())
