"""Rewards: one registry of functions of the classifier's belief before and after a glimpse.

A reward is ``fn(before: Belief, after: Belief) -> float32 [B]``, batched over the env's rows on the
model's device. ``before`` is the belief after the previous glimpse (the empty pass at reset), ``after``
the belief this glimpse produced. A new reward is one decorated function in any file::

    from envs.rewards import Belief, register_reward

    @register_reward("confidence")
    def confidence(before: Belief, after: Belief) -> torch.Tensor:
        return after.probs.max(-1).values - before.probs.max(-1).values

then ``gym.make(..., reward="confidence")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avex.registry import Registry

__all__ = ["REWARDS", "Belief", "RewardFn", "dense", "register_reward", "sparse"]


@dataclass(frozen=True)
class Belief:
    """What the classifier believes about B rows at one moment of their episodes.

    Attributes:
        logits: float32 [B, classes].
        labels: int64 [B], the true classes.
        final: bool [B], True where the budget is spent (the episode ends with this belief).
    """

    logits: torch.Tensor
    labels: torch.Tensor
    final: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """float32 [B]: cross-entropy of the true class."""
        return F.cross_entropy(self.logits, self.labels, reduction="none")

    @property
    def probs(self) -> torch.Tensor:
        """float32 [B, classes]."""
        return self.logits.softmax(-1)

    @property
    def correct(self) -> torch.Tensor:
        """bool [B]: the top class is the true one."""
        return self.logits.argmax(-1) == self.labels


RewardFn = Callable[[Belief, Belief], torch.Tensor]
REWARDS: Registry[RewardFn] = Registry("reward")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn(before, after) -> float32 [B]`` as the reward ``name``."""
    return REWARDS.register(name)


@register_reward("dense")
def dense(before: Belief, after: Belief) -> torch.Tensor:
    """The drop of the true class's cross-entropy: an episode's return telescopes to ``L_0 - L_T``."""
    return before.loss - after.loss


@register_reward("sparse")
def sparse(before: Belief, after: Belief) -> torch.Tensor:
    """1 at the last glimpse if the final prediction is right, else 0."""
    return (after.correct & after.final).float()
