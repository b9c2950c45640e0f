"""The common agent interface: batched in, batched out, so one agent drives a single or a vector env."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

__all__ = ["GlimpseAgent", "make_agent"]


class GlimpseAgent(ABC):
    """Chooses the next glimpse for a batch of environments.

    ``act`` takes the vector env's observation dict (every entry has a leading batch axis N) and the
    action masks bool [N, A] (all True in continuous mode) and returns N actions: int64 [N] glimpse
    positions (discrete) or float32 [N, 3] (continuous). For a single env, add the batch axis with
    :meth:`act_single`.
    """

    name: str = "agent"

    def reset(self, seed: int | None = None) -> None:
        """Start over (re-seed the agent's own randomness, if any)."""

    @abstractmethod
    def act(self, obs: dict[str, np.ndarray], action_mask: np.ndarray) -> np.ndarray:
        """obs: {key: [N, ...]}, action_mask: bool [N, A] -> actions [N] (or [N, 3])."""

    def act_single(self, obs: dict[str, Any], action_mask: np.ndarray) -> Any:
        """One env's observation (no batch axis) -> one action."""
        batched = {k: np.asarray(v)[None] for k, v in obs.items()}
        return self.act(batched, np.asarray(action_mask, dtype=bool)[None])[0]


def make_agent(name: str, env: Any, seed: int = 0, checkpoint: str | None = None, device: str = "cpu") -> GlimpseAgent:
    """Build an agent by name ('random', 'entropy', 'ppo') for an env (single or vector)."""
    from agents.entropy import EntropyAgent
    from agents.random import RandomAgent

    if name == "random":
        return RandomAgent(seed)
    if name == "entropy":
        return EntropyAgent.for_env(env)
    if name == "ppo":
        from agents.ppo import PPOAgent

        return PPOAgent.load(checkpoint or "shipped:fashion-mnist", env, device=device)
    raise ValueError(f"unknown agent {name!r}: choose 'random', 'entropy' or 'ppo'")
