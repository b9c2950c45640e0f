"""Gymnasium environments for Active Visual Exploration over a TORE-backed ViT.

``import envs`` (or ``import avex``) registers one id per registered data set (``AVE-FashionMNIST-v0``,
``AVE-ImageNet-v0``, ``AVE-ImageFolder-v0``, and any a user registers): see :mod:`envs.registration`.
:class:`AVEEnv` is the single environment, :class:`AVEVectorEnv` the native batched one
(``gym.make_vec``), :class:`SB3VecEnv` its stable-baselines3 adapter; all run the same
:class:`envs.engine.AVEEngine`. Rewards come from :data:`envs.rewards.REWARDS`.
"""

from envs.ave_env import AVEEnv
from envs.config import EnvConfig
from envs.engine import AVEEngine
from envs.registration import register_envs
from envs.rewards import REWARDS, Belief, register_reward
from envs.sb3 import SB3VecEnv
from envs.vector import AVEVectorEnv

__all__ = [
    "REWARDS",
    "AVEEngine",
    "AVEEnv",
    "AVEVectorEnv",
    "Belief",
    "EnvConfig",
    "SB3VecEnv",
    "register_envs",
    "register_reward",
]

register_envs()
