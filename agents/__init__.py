"""Glimpse policies behind one small interface (:class:`agents.base.GlimpseAgent`) and one registry.

* :class:`RandomAgent` (``"random"``) - uniform over the allowed positions (seeded).
* :class:`EntropyAgent` (``"entropy"``) - AME's rule on the environment's attention-entropy map.
* :class:`LookaheadAgent` (``"lookahead"``) - imagines every allowed glimpse (decoder reconstruction, one cached
  TORE step each on a copy of the cache) and takes the one after which the class entropy is lowest.
* :class:`PPOAgent` (``"ppo"``) - a MaskablePPO policy (PPO for continuous glimpses) on the environment's belief
  (probabilities, CLS embedding, entropy map, visited patches, step; with ``ink``, where ink was seen).

Importing this package registers them; ``make_agent(name, env)`` builds any registered agent.
``evaluate_accuracy(policy, env_id, ...)`` reports the accuracy after every glimpse, with 95% intervals,
of any policy: an agent, a stable-baselines3 model or policy, or a function (:mod:`agents.adapters`).
"""

from agents.base import AGENTS, GlimpseAgent, make_agent, register_agent
from agents.entropy import EntropyAgent, ame_scores
from agents.evaluate import AccuracyReport, EpisodeStats, evaluate_accuracy, play_episodes
from agents.lookahead import LookaheadAgent
from agents.ppo import PPOAgent
from agents.random import RandomAgent

__all__ = [
    "AGENTS",
    "AccuracyReport",
    "EntropyAgent",
    "EpisodeStats",
    "GlimpseAgent",
    "LookaheadAgent",
    "PPOAgent",
    "RandomAgent",
    "ame_scores",
    "evaluate_accuracy",
    "make_agent",
    "play_episodes",
    "register_agent",
]
