"""Glimpse policies behind one small interface (:class:`agents.base.GlimpseAgent`).

* :class:`RandomAgent` - uniform over the allowed positions (seeded).
* :class:`EntropyAgent` - AME's rule on the environment's attention-entropy map.
* :class:`PPOAgent` - a MaskablePPO policy on the environment's belief (probabilities, CLS embedding,
  entropy map, visited patches).
"""

from agents.base import GlimpseAgent, make_agent
from agents.entropy import EntropyAgent, ame_scores
from agents.random import RandomAgent

__all__ = ["EntropyAgent", "GlimpseAgent", "PPOAgent", "RandomAgent", "ame_scores", "make_agent"]


def __getattr__(name: str):
    if name == "PPOAgent":  # stable-baselines3 is imported only when PPO is used
        from agents.ppo import PPOAgent

        return PPOAgent
    raise AttributeError(name)
