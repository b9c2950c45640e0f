"""avex: Active Visual Exploration on a TORE-backed Vision Transformer, with Gymnasium environments.

``import avex`` is the facade on top of the layers (core ``avex.*`` -> ``envs`` -> ``agents``): it
registers one Gymnasium id per registered data set (``AVE-FashionMNIST-v0``, ``AVE-ImageNet-v0``,
``AVE-ImageFolder-v0``; see :mod:`envs.registration`) and gathers the extension points::

    avex.register_dataset(spec)     # a data set (and its env id)     -> avex.data.DATASETS
    avex.register_agent("name")     # a glimpse policy (decorator)    -> agents.AGENTS
    avex.register_reward("name")    # a reward (decorator)            -> envs.rewards.REWARDS
"""

from typing import Any

from avex import _compat as _compat  # first: applies the timm import shim before anything imports timm
from avex.cache import AggregatorOutput, TokenCache
from avex.data import DATASETS, DatasetSpec, register_dataset
from avex.geometry import GlimpseGeometry
from avex.model import TOREViT, create_tore
from envs import registration as _registration
from envs.rewards import REWARDS, Belief, register_reward

__version__ = "0.1.0"
__all__ = [
    "AGENTS",
    "DATASETS",
    "REWARDS",
    "AggregatorOutput",
    "Belief",
    "DatasetSpec",
    "GlimpseGeometry",
    "TOREViT",
    "TokenCache",
    "__version__",
    "create_tore",
    "make_agent",
    "register_agent",
    "register_dataset",
    "register_reward",
]

_registration.register_envs()

_AGENT_NAMES = ("AGENTS", "make_agent", "register_agent")


def __getattr__(name: str) -> Any:
    # agents sit above envs and import avex modules themselves: loaded on first use, not at import.
    if name in _AGENT_NAMES:
        import agents

        return getattr(agents, name)
    raise AttributeError(f"module 'avex' has no attribute {name!r}")
