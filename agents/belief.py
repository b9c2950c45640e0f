"""What a learned glimpse policy reads: the classifier's belief, and optionally where ink was seen.

The belief keys are what the TORE model already computed for the env: class probabilities, the
aggregator's CLS embedding, the AME entropy map, the visited patches and the step. A policy may also read
:data:`INK`, the revealed canvas pooled to the patch grid (each patch's mean revealed intensity): the CLS
embedding says *what* was seen, this map says *where* the object's pixels were found. The canvas itself is
left out (a rollout buffer of float32 canvases would cost gigabytes); the map is computed from it on the host
(:func:`ink_map`). :class:`BeliefObservation` gives any single env exactly these keys, for stable-baselines3
as users write it::

    env = BeliefObservation(gym.make("AVE-FashionMNIST-v0"))
    model = MaskablePPO("MultiInputPolicy", env, policy_kwargs=POLICY_KWARGS, gamma=1.0)
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from agents.base import require_keys

__all__ = ["BELIEF_KEYS", "INK", "BeliefObservation", "belief", "belief_space", "env_keys", "ink_map"]

BELIEF_KEYS = ("probs", "cls", "entropy", "visited", "step")
INK = "ink"  # the derived key: float32 [gh, gw], each patch's mean revealed intensity in [0, 1]


def env_keys(ink: bool = False) -> tuple[str, ...]:
    """The env's ``obs_keys`` a belief policy needs: the belief keys, and the canvas that the ink map pools."""
    return (*BELIEF_KEYS, "canvas") if ink else BELIEF_KEYS


def belief_space(space: spaces.Space[Any], ink: bool = False) -> spaces.Dict:
    """The observation space of a belief policy: :data:`BELIEF_KEYS` of ``space``, and :data:`INK` with ``ink``.

    Raises:
        ValueError: not a Dict space, or one that lacks a key the policy reads (with ``ink``, the canvas).
    """
    if not isinstance(space, spaces.Dict):
        raise ValueError(f"a belief policy needs the env's Dict observation space, got {space}")
    require_keys(space.spaces, env_keys(ink), "a belief policy" + (" with the ink map" if ink else ""))
    out = {k: space[k] for k in BELIEF_KEYS}
    if ink:
        grid = space["visited"].shape
        canvas = space["canvas"].shape
        if grid is None or canvas is None or canvas[0] % grid[0] or canvas[1] % grid[1]:
            raise ValueError(f"the ink map pools the canvas {canvas} to the patch grid {grid}: they must divide")
        out[INK] = spaces.Box(0.0, 1.0, grid, np.float32)
    return spaces.Dict(out)


def ink_map(canvas: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Each patch's mean revealed intensity: uint8 [..., H, W, C] -> float32 [..., gh, gw] in [0, 1] (unseen = 0)."""
    *lead, h, w, c = canvas.shape
    gh, gw = grid
    x = canvas.reshape(*lead, gh, h // gh, gw, (w // gw) * c)
    # Integer sums over one axis at a time: 4x faster than a float mean over three strided axes, and exact.
    total = x.sum(axis=-3, dtype=np.uint32).sum(axis=-1)  # [..., gh, gw]
    return (total / (x.shape[-3] * x.shape[-1] * 255.0)).astype(np.float32)


def belief(obs: dict[str, Any], ink: bool = False) -> dict[str, Any]:
    """A belief policy's observation from the env's: the belief keys, and the ink map from the canvas with ``ink``.

    Works on one env's observation and on a batch alike (the map pools the last three axes of the canvas).
    """
    out = {k: obs[k] for k in BELIEF_KEYS}
    if ink:
        out[INK] = ink_map(np.asarray(obs["canvas"]), np.asarray(obs["visited"]).shape[-2:])
    return out


class BeliefObservation(gym.ObservationWrapper[dict[str, Any], Any, dict[str, Any]]):
    """A single avex env whose observations hold only a belief policy's keys (:func:`belief`); ``action_masks()``
    is passed on (Gymnasium wrappers do not forward attributes, and sb3-contrib's MaskablePPO asks the env for it).

    Args:
        env: an avex env whose observation holds :func:`env_keys` (``ink`` needs the canvas).
        ink: add the :data:`INK` map.
    """

    def __init__(self, env: gym.Env[dict[str, Any], Any], ink: bool = False) -> None:
        super().__init__(env)
        self.ink = ink
        self.observation_space: spaces.Space[dict[str, Any]] = belief_space(env.observation_space, ink)

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        return belief(observation, self.ink)

    def action_masks(self) -> np.ndarray:
        """bool [A]: the positions allowed now."""
        masks: np.ndarray = self.env.unwrapped.action_masks()  # type: ignore[attr-defined]  # an avex env
        return masks
