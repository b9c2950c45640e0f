"""The common agent interface and the agent registry.

Agents are batched in, batched out, so one agent drives a single or a vector env. A new agent is one
file: subclass :class:`GlimpseAgent`, decorate it with ``@register_agent("name")``, and import the
file once; ``make_agent``, ``avex benchmark --agents`` and ``avex demo --agent`` then know it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import numpy as np

from avex.checks import check_device, check_int
from avex.registry import Registry

__all__ = ["AGENTS", "GlimpseAgent", "make_agent", "register_agent", "require_env_keys", "require_keys"]


def require_keys(present: Collection[str], keys: Sequence[str], reader: str) -> None:
    """Refuse an observation (its keys, or its space's) that lacks keys ``reader`` reads.

    Raises:
        ValueError: naming the missing keys and the fix (the env's ``obs_keys``).
    """
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValueError(
            f"{reader} reads the observation keys {list(keys)}; this env's observation lacks {missing} (its obs_keys "
            f"leave out {missing}): make the env with obs_keys=None (every key) or with those keys in obs_keys"
        )


def require_env_keys(env: Any, keys: Sequence[str], reader: str) -> None:
    """:func:`require_keys` on the observation space of an avex env (single, vector or wrapped: one env's space)."""
    u = getattr(env, "unwrapped", env)
    space = getattr(u, "single_observation_space", getattr(u, "observation_space", None))
    require_keys(getattr(space, "spaces", {}), keys, reader)


class GlimpseAgent(ABC):
    """Chooses the next glimpse for a batch of environments.

    ``act`` takes the vector env's observation dict (every entry has a leading batch axis N) and the
    action masks bool [N, A] (all True in continuous mode) and returns N actions: int64 [N] glimpse
    positions (discrete) or float32 [N, 3] (continuous). For a single env, add the batch axis with
    :meth:`act_single`.
    """

    name: str = "agent"
    #: True for an agent that runs the model once per candidate position: ``avex benchmark`` leaves it out
    #: of its default agents on a CPU (it would take the main job from minutes to most of an hour).
    heavy: bool = False

    @classmethod
    def from_env(cls, env: Any, *, seed: int = 0, policy: str | None = None, device: str = "cpu") -> GlimpseAgent:
        """Build the agent for an env (single, vector or wrapped); what each agent reads off it is its own.

        Args:
            seed: the agent's own randomness, if any.
            policy: weights of a learned agent (a path, or ``"shipped:<name>"``); others ignore it.
            device: where a learned agent runs.
        """
        return cls()

    def reset(self, seed: int | None = None) -> None:
        """Start over (re-seed the agent's own randomness, if any)."""
        del seed  # a deterministic agent has nothing to re-seed

    @abstractmethod
    def act(self, obs: dict[str, np.ndarray], action_mask: np.ndarray) -> np.ndarray:
        """obs: {key: [N, ...]}, action_mask: bool [N, A] -> actions [N] (or [N, 3])."""

    def act_single(self, obs: dict[str, Any], action_mask: np.ndarray) -> Any:
        """One env's observation (no batch axis) -> one action."""
        batched = {k: np.asarray(v)[None] for k, v in obs.items()}
        return self.act(batched, np.asarray(action_mask, dtype=bool)[None])[0]


AGENTS: Registry[type[GlimpseAgent]] = Registry("agent")
A = TypeVar("A", bound=type[GlimpseAgent])


def register_agent(name: str) -> Callable[[A], A]:
    """Class decorator: register a :class:`GlimpseAgent` subclass under ``name`` (also its ``name``)."""

    def add(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, GlimpseAgent)):
            raise TypeError(f"register_agent({name!r}) decorates GlimpseAgent subclasses, got {cls!r}")
        cls.name = name
        AGENTS.register(name, cls)
        return cls

    return add


def make_agent(name: str, env: Any, seed: int = 0, policy: str | None = None, device: str = "cpu") -> GlimpseAgent:
    """Build a registered agent by name for an env (single or vector); see :meth:`GlimpseAgent.from_env`.

    Raises:
        ValueError: unknown name (the message lists the registered agents), a bad seed or device, or an env that is
            not avex's.
    """
    factory = AGENTS.get(name)
    check_int("seed", seed, 0)
    check_device("device", device)  # torch would refuse "gpu" only once a policy is built, with a RuntimeError
    if not hasattr(getattr(env, "unwrapped", env), "engine"):
        raise ValueError(
            "env must be an avex environment (gym.make or gym.make_vec of an AVE-* id, wrapped or not), "
            f"got {type(env).__name__}"
        )
    return factory.from_env(env, seed=seed, policy=policy, device=device)
