"""What a learned glimpse policy reads: the classifier's belief, never the pixels.

The belief keys are what the TORE model already computed for the env: class probabilities, the
aggregator's CLS embedding, the AME entropy map, the visited patches and the step. The revealed canvas
is left out: the CLS embedding summarises it, and a rollout buffer of float32 canvases would cost
gigabytes. :class:`BeliefObservation` gives any single env exactly these keys, for stable-baselines3 as
users write it::

    env = BeliefObservation(gym.make("AVE-FashionMNIST-v0"))
    model = MaskablePPO("MultiInputPolicy", env, policy_kwargs=POLICY_KWARGS, gamma=1.0)
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from agents.base import require_keys

__all__ = ["BELIEF_KEYS", "BeliefObservation", "belief_space"]

BELIEF_KEYS = ("probs", "cls", "entropy", "visited", "step")


def belief_space(space: spaces.Space[Any]) -> spaces.Dict:
    """The observation space restricted to :data:`BELIEF_KEYS`.

    Raises:
        ValueError: not a Dict space, or one that lacks a belief key.
    """
    if not isinstance(space, spaces.Dict):
        raise ValueError(f"a belief policy needs the env's Dict observation space, got {space}")
    require_keys(space.spaces, BELIEF_KEYS, "a belief policy")
    return spaces.Dict({k: space[k] for k in BELIEF_KEYS})


class BeliefObservation(gym.ObservationWrapper[dict[str, Any], Any, dict[str, Any]]):
    """A single avex env whose observations hold only :data:`BELIEF_KEYS`; ``action_masks()`` is passed on
    (Gymnasium wrappers do not forward attributes, and sb3-contrib's MaskablePPO asks the env for it)."""

    def __init__(self, env: gym.Env[dict[str, Any], Any]) -> None:
        super().__init__(env)
        self.observation_space: spaces.Space[dict[str, Any]] = belief_space(env.observation_space)

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        return {k: observation[k] for k in BELIEF_KEYS}

    def action_masks(self) -> np.ndarray:
        """bool [A]: the positions allowed now."""
        masks: np.ndarray = self.env.unwrapped.action_masks()  # type: ignore[attr-defined]  # an avex env
        return masks
