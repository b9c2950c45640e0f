"""Gymnasium environments for Active Visual Exploration over a TORE-backed ViT.

``import envs`` (or ``import avex``) registers ``AVE-FashionMNIST-v0``, ``AVE-ImageNet-v0`` and
``AVE-ImageFolder-v0``. :class:`AVEEnv` is the single environment, :class:`AVEVectorEnv` the native
batched one (``gym.make_vec``), :class:`SB3VecEnv` its stable-baselines3 adapter; all run the same
:class:`envs.core.AVEBatch` engine.
"""

import avex  # noqa: F401  (registers the environment ids)
from envs.ave_env import AVEEnv
from envs.core import AVEBatch, EnvConfig
from envs.sb3 import SB3VecEnv
from envs.vector import AVEVectorEnv

__all__ = ["AVEBatch", "AVEEnv", "AVEVectorEnv", "EnvConfig", "SB3VecEnv"]
