"""Glimpse policies behind one small interface (:class:`agents.base.GlimpseAgent`) and one registry.

* :class:`RandomAgent` (``"random"``) - uniform over the allowed positions (seeded).
* :class:`EntropyAgent` (``"entropy"``) - AME's rule on the environment's attention-entropy map.
* :class:`PPOAgent` (``"ppo"``) - a MaskablePPO policy on the environment's belief (probabilities,
  CLS embedding, entropy map, visited patches).

Importing this package registers them; ``make_agent(name, env)`` builds any registered agent.
``evaluate_accuracy(policy, env_id, ...)`` reports the accuracy after every glimpse, with 95% intervals,
of any policy: an agent, a stable-baselines3 model or policy, or a function (:mod:`agents.adapters`).
"""

from agents.base import AGENTS, GlimpseAgent, make_agent, register_agent
from agents.entropy import EntropyAgent, ame_scores
from agents.evaluate import AccuracyReport, EpisodeStats, evaluate_accuracy, play_episodes
from agents.ppo import PPOAgent
from agents.random import RandomAgent

__all__ = [
    "AGENTS",
    "AccuracyReport",
    "EntropyAgent",
    "EpisodeStats",
    "GlimpseAgent",
    "PPOAgent",
    "RandomAgent",
    "ame_scores",
    "evaluate_accuracy",
    "make_agent",
    "play_episodes",
    "register_agent",
]
