"""A PPO glimpse policy (stable-baselines3 / sb3-contrib) acting on the environment's belief.

Policies are saved as safetensors + JSON (never unpickled) and rebuilt from the env's spaces when
loaded (:mod:`agents.sb3_policy`); training is :func:`agents.ppo_train.train_ppo`. stable-baselines3
is imported only when a policy is loaded, so listing the agents stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from gymnasium import spaces

from agents.base import GlimpseAgent, register_agent
from agents.belief import BELIEF_KEYS
from avex.checkpoint import resolve_file
from avex.safeload import read_header, read_json

if TYPE_CHECKING:  # stable-baselines3 is imported only when a policy is built
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
    from stable_baselines3.common.policies import BasePolicy

__all__ = ["DEFAULT_POLICY", "PPOAgent"]

DEFAULT_POLICY = "shipped:fashion-mnist"


@register_agent("ppo")
class PPOAgent(GlimpseAgent):
    """A trained PPO policy acting deterministically (mode of its action distribution)."""

    def __init__(self, policy: BasePolicy, continuous: bool, meta: dict[str, Any] | None = None) -> None:
        self.policy = policy.eval()
        self.continuous = continuous
        self.meta = meta or {}

    @classmethod
    def from_env(cls, env: Any, *, seed: int = 0, policy: str | None = None, device: str = "cpu") -> PPOAgent:
        return cls.load(policy or DEFAULT_POLICY, env, device=device)

    @classmethod
    def load(cls, path: str | Path, env: Any, device: str = "cpu") -> PPOAgent:
        """Rebuild a saved policy for an env (single or vector) whose spaces it must fit.

        Args:
            path: ``.safetensors`` with its ``.json``, or ``"shipped:fashion-mnist"``.

        Raises:
            FileNotFoundError: the policy or its JSON is missing.
            ValueError: not an avex PPO policy (not safetensors, a bad JSON, another format), or one that does
                not fit the env's spaces. The weights are read by safetensors only, never unpickled.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from agents.sb3_policy import FORMAT, build_policy

        weights = resolve_file(path, policy=True)
        read_header(weights, "PPO policy")  # a regular safetensors file, before anything is built
        meta = read_json(weights.with_suffix(".json"), "PPO policy config")
        if meta.get("format") != FORMAT or not isinstance(meta.get("continuous"), bool):
            raise ValueError(
                f"{weights.with_suffix('.json')} is not an avex PPO policy "
                f"(format {meta.get('format')!r}, expected {FORMAT!r}, with 'continuous': true or false)"
            )
        u = env.unwrapped if hasattr(env, "unwrapped") else env
        obs_space = getattr(u, "single_observation_space", u.observation_space)
        act_space = getattr(u, "single_action_space", u.action_space)
        continuous = isinstance(act_space, spaces.Box)
        if continuous != meta["continuous"]:
            trained = "continuous" if meta["continuous"] else "discrete"
            raise ValueError(f"policy {weights} was trained for {trained} actions; this env's are {act_space}")
        policy = build_policy(obs_space, act_space)
        try:
            load_model(policy, str(weights), strict=True)
        except (RuntimeError, SafetensorError) as err:
            raise ValueError(
                f"policy {weights} does not fit this env's spaces (trained on {meta.get('env_id')} "
                f"with {meta.get('num_actions')} actions; this env has {getattr(act_space, 'n', act_space)}): {err}"
            ) from err
        return cls(policy.to(device), continuous, meta)

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], action_mask: np.ndarray) -> np.ndarray:
        belief = {k: obs[k] for k in BELIEF_KEYS}
        if self.continuous:
            actions, _ = self.policy.predict(belief, deterministic=True)
            return np.clip(actions, 0.0, 1.0).astype(np.float32)
        # A discrete policy is sb3-contrib's maskable one (agents.sb3_policy.build_policy).
        maskable = cast("MaskableActorCriticPolicy", self.policy)
        actions, _ = maskable.predict(belief, deterministic=True, action_masks=np.asarray(action_mask, dtype=bool))
        return np.asarray(actions, dtype=np.int64)
