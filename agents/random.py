"""Uniform random glimpses over the allowed positions."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from agents.base import GlimpseAgent, register_agent
from avex.checks import check_int

__all__ = ["RandomAgent"]


@register_agent("random")
class RandomAgent(GlimpseAgent):
    """Uniform over allowed positions (discrete) or over [0, 1]^3 (continuous, when given no mask).

    Args:
        seed: seeds the agent's own generator (independent of the environment's).
        continuous: emit (y, x, z) actions instead of positions.
    """

    def __init__(self, seed: int | None = 0, continuous: bool = False) -> None:
        self.continuous = continuous
        self.reset(seed)

    @classmethod
    def from_env(cls, env: Any, *, seed: int = 0, policy: str | None = None, device: str = "cpu") -> RandomAgent:
        # The env's action space says the mode: a Box of (y, x, z) glimpses, or Discrete positions.
        space = getattr(env, "single_action_space", None) or env.action_space
        return cls(seed, continuous=isinstance(space, gym.spaces.Box))

    def reset(self, seed: int | None = None) -> None:
        """Re-seed the agent's generator. Raises ValueError (naming ``seed``) unless it is an int >= 0 or None."""
        self.rng = np.random.default_rng(None if seed is None else check_int("seed", seed, 0))

    def act(self, obs: dict[str, np.ndarray], action_mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(action_mask, dtype=bool)
        if self.continuous:
            return self.rng.random((mask.shape[0], 3), dtype=np.float32)
        if not mask.any(axis=1).all():
            raise ValueError("an environment has no allowed glimpse position left (budget larger than the positions?)")
        # Random scores, -1 where masked, argmax: one uniform draw among allowed positions per row.
        scores = np.where(mask, self.rng.random(mask.shape), -1.0)
        return scores.argmax(axis=1).astype(np.int64)
