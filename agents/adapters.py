"""Any glimpse policy as a :class:`agents.base.GlimpseAgent`, so that one episode loop plays them all.

* :class:`PredictAgent` - a stable-baselines3 model or policy, or anything with
  ``predict(obs, deterministic=True[, action_masks=...])`` returning ``(actions, state)``.
* :class:`CallableAgent` - a plain function ``(obs_batch, action_mask) -> actions``.

:func:`as_agent` picks the adapter. Nothing here imports stable-baselines3: an SB3 object is recognised
by its ``predict`` method and spaces, so this module stays as light as :mod:`agents.base`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from gymnasium import spaces

from agents.base import GlimpseAgent, require_keys
from agents.belief import INK, belief, env_keys
from avex.checks import brief

__all__ = ["CallableAgent", "PolicyLike", "PredictAgent", "SupportsPredict", "as_agent"]


@runtime_checkable
class SupportsPredict(Protocol):
    """stable-baselines3's prediction interface (a model such as ``MaskablePPO``, or its ``.policy``)."""

    def predict(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]: ...


PolicyLike = GlimpseAgent | SupportsPredict | Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray]


class PredictAgent(GlimpseAgent):
    """An object with SB3's ``predict`` acting deterministically on a batch of envs.

    It gets the observation keys of its own ``observation_space`` (a policy trained on
    :class:`agents.belief.BeliefObservation` gets the belief keys, and the ink map pooled from the canvas
    where its space holds :data:`agents.belief.INK`; one trained on the whole observation gets it whole;
    without an ``observation_space``, everything), and the action masks when its ``predict`` takes
    ``action_masks`` (sb3-contrib's maskable models and policies).

    Raises:
        ValueError: ``observation_space`` is not a Dict space (avex observations are Dicts).
    """

    name = "predict"

    def __init__(self, model: SupportsPredict) -> None:
        self.model = model
        space = getattr(model, "observation_space", None)
        if space is not None and not isinstance(space, spaces.Dict):
            raise ValueError(
                f"{type(model).__name__} was trained on {space}, not on an avex env's Dict observation: "
                "train it on the env itself, or on agents.belief.BeliefObservation(env)"
            )
        self.keys: tuple[str, ...] | None = None if space is None else tuple(space.spaces)
        self.ink = self.keys is not None and INK in self.keys  # derived from the canvas, as in training
        self.masked = "action_masks" in inspect.signature(model.predict).parameters
        self.continuous = isinstance(getattr(model, "action_space", None), spaces.Box)

    def act(self, obs: dict[str, np.ndarray], action_mask: np.ndarray) -> np.ndarray:
        if self.ink:
            require_keys(obs, env_keys(ink=True), f"{type(self.model).__name__} (it reads the ink map)")
            obs = belief(obs, ink=True)
        if self.keys is not None:
            require_keys(obs, self.keys, type(self.model).__name__)
            obs = {k: obs[k] for k in self.keys}
        kwargs = {"action_masks": np.asarray(action_mask, dtype=bool)} if self.masked else {}
        actions, _ = self.model.predict(obs, deterministic=True, **kwargs)
        # SB3 already clips Box actions to the action space; the dtype is what the env expects.
        return np.asarray(actions, dtype=np.float32 if self.continuous else np.int64)


class CallableAgent(GlimpseAgent):
    """A function ``(obs: {key: [N, ...]}, action_mask: bool [N, A]) -> actions [N] (or [N, 3])``."""

    name = "callable"

    def __init__(self, fn: Callable[[dict[str, np.ndarray], np.ndarray], Any]) -> None:
        self.fn = fn

    def act(self, obs: dict[str, np.ndarray], action_mask: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(obs, action_mask))


def as_agent(policy: PolicyLike) -> GlimpseAgent:
    """``policy`` itself if it is a :class:`GlimpseAgent`, else :class:`PredictAgent` for anything with a
    ``predict`` method (SB3), else :class:`CallableAgent` for a callable.

    Raises:
        ValueError: none of these.
    """
    if isinstance(policy, GlimpseAgent):
        return policy
    if isinstance(policy, SupportsPredict):
        return PredictAgent(policy)  # an SB3 policy is also callable (an nn.Module): predict comes first
    if callable(policy):
        return CallableAgent(policy)
    raise ValueError(
        "policy must be a GlimpseAgent, an object with predict(obs, deterministic=True) such as a stable-baselines3 "
        f"model, or a function (obs, action_mask) -> actions; got {type(policy).__name__} {brief(policy)}"
    )
