"""Glimpse policies behind one small interface (:class:`agents.base.GlimpseAgent`) and one registry.

* :class:`RandomAgent` (``"random"``) - uniform over the allowed positions (seeded).
* :class:`EntropyAgent` (``"entropy"``) - AME's rule on the environment's attention-entropy map.
* :class:`PPOAgent` (``"ppo"``) - a MaskablePPO policy on the environment's belief (probabilities,
  CLS embedding, entropy map, visited patches).

Importing this package registers them; ``make_agent(name, env)`` builds any registered agent.
"""

from agents.base import AGENTS, GlimpseAgent, make_agent, register_agent
from agents.entropy import EntropyAgent, ame_scores
from agents.evaluate import EpisodeStats, play_episodes
from agents.ppo import PPOAgent
from agents.random import RandomAgent

__all__ = [
    "AGENTS",
    "EntropyAgent",
    "EpisodeStats",
    "GlimpseAgent",
    "PPOAgent",
    "RandomAgent",
    "ame_scores",
    "make_agent",
    "play_episodes",
    "register_agent",
]
