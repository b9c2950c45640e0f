"""AME's glimpse selection on the environment's attention-entropy map (arXiv 2303.06457)."""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import GlimpseAgent, register_agent, require_env_keys, require_keys

__all__ = ["EntropyAgent", "ame_scores"]


def ame_scores(entropy: np.ndarray, visited: np.ndarray, glimpse: int, stride: int = 1) -> np.ndarray:
    """AME's score of every glimpse position.

    Seen patches get zero entropy; a g x g average pool at stride one patch scores each top-left
    position; positions off the ``stride`` lattice are dropped.

    Args:
        entropy: float [N, gh, gw] per-patch attention entropy.
        visited: {0, 1} [N, gh, gw].

    Returns:
        float [N, A] scores, row-major over positions (the env's discrete action order).
    """
    e = np.where(np.asarray(visited) > 0, 0.0, np.asarray(entropy, dtype=np.float64))
    n, gh, gw = e.shape
    # Summed-area table: every g x g window sum in O(1).
    sat = np.zeros((n, gh + 1, gw + 1))
    sat[:, 1:, 1:] = e.cumsum(1).cumsum(2)
    g = glimpse
    win = sat[:, g:, g:] - sat[:, :-g, g:] - sat[:, g:, :-g] + sat[:, :-g, :-g]
    return (win[:, ::stride, ::stride] / (g * g)).reshape(n, -1)


@register_agent("entropy")
class EntropyAgent(GlimpseAgent):
    """Look next where the decoder is most uncertain: argmax of :func:`ame_scores` over allowed positions.

    Deterministic; the first glimpse (from the empty pass) is the same place for every image, as in AME.
    """

    def __init__(self, glimpse: int, stride: int = 1) -> None:
        self.glimpse = glimpse
        self.stride = stride

    @classmethod
    def from_env(cls, env: Any, *, seed: int = 0, policy: str | None = None, device: str = "cpu") -> EntropyAgent:
        """Read the glimpse size and position stride off an avex env (single, vector or wrapped).

        Raises:
            ValueError: a continuous env (AME's rule scores grid positions), or an observation without the entropy
                map or the visited patches (``obs_keys``).
        """
        u = env.unwrapped if hasattr(env, "unwrapped") else env
        if u.engine.config.action_mode != "discrete":
            raise ValueError("the entropy agent chooses grid positions: make the env with action_mode='discrete'")
        require_env_keys(u, ("entropy", "visited"), "the entropy agent")
        return cls(u.geometry.glimpse, u.geometry.stride)

    def act(self, obs: dict[str, np.ndarray], action_mask: np.ndarray) -> np.ndarray:
        require_keys(obs, ("entropy", "visited"), "the entropy agent")
        scores = ame_scores(obs["entropy"], obs["visited"], self.glimpse, self.stride)
        mask = np.asarray(action_mask, dtype=bool)
        if mask.ndim != 2 or mask.shape[0] != scores.shape[0]:
            raise ValueError(
                f"action_mask must be bool [N, A] with one row per observation ({scores.shape[0]}), "
                f"got shape {mask.shape}"
            )
        if scores.shape != mask.shape:
            raise ValueError(
                f"entropy map gives {scores.shape[1]} positions but the action mask has {mask.shape[1]}: "
                f"glimpse={self.glimpse}, stride={self.stride} do not match the env"
            )
        return np.where(mask, scores, -np.inf).argmax(axis=1).astype(np.int64)
