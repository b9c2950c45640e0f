"""The stable-baselines3 side of avex's PPO policies: what the policy reads and how it is built.

The policy reads what the TORE model already computed for the env - class probabilities, the aggregator's
CLS embedding, the AME entropy map, the visited patches and the step - and, if built with ``ink=True``, the
revealed canvas pooled to the patch grid (:data:`agents.belief.INK`), never the pixels themselves.
Discrete mode uses sb3-contrib's maskable policy (repeats are masked), continuous (y, x, z) mode SB3's
plain one. This module imports stable-baselines3, so :mod:`agents.ppo` imports it only when a policy
is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from gymnasium import spaces
from safetensors.torch import save_model
from stable_baselines3.common.policies import BasePolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from agents.belief import INK, belief, belief_space

if TYPE_CHECKING:  # sb3-contrib is imported only for discrete actions
    from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy

__all__ = [
    "FORMAT",
    "POLICY_KWARGS",
    "BeliefExtractor",
    "BeliefKeys",
    "build_policy",
    "policy_class",
    "save_policy",
]

FORMAT = "avex-ppo/1"  # the "format" field of a saved policy's JSON


class BeliefKeys(VecEnvWrapper):
    """SB3 VecEnv wrapper that passes on a belief policy's observation (:func:`agents.belief.belief`): the belief
    keys of the Dict observation, and the ink map with ``ink``."""

    def __init__(self, venv: VecEnv, ink: bool = False) -> None:
        super().__init__(venv, observation_space=belief_space(venv.observation_space, ink))
        self.ink = ink

    def _filter(self, obs: VecEnvObs) -> dict[str, np.ndarray]:
        if not isinstance(obs, dict):
            raise TypeError(f"BeliefKeys needs Dict observations, got {type(obs).__name__}")
        return belief(obs, self.ink)

    def reset(self) -> dict[str, np.ndarray]:
        return self._filter(self.venv.reset())

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            if "terminal_observation" in info:
                info["terminal_observation"] = self._filter(info["terminal_observation"])
        return self._filter(obs), rewards, dones, infos

    def action_masks(self) -> np.ndarray:
        return np.stack(self.venv.env_method("action_masks"))


def _shape(space: spaces.Dict, key: str) -> tuple[int, ...]:
    shape = space[key].shape
    if shape is None:
        raise ValueError(f"observation {key!r} needs a fixed shape, got {space[key]}")
    return shape


class BeliefExtractor(BaseFeaturesExtractor):
    """Features from the belief: a small CNN over the [unseen entropy, visited(, ink)] maps [B, 2 or 3, gh, gw] and
    an MLP over [probabilities, normalised CLS embedding, step]. Output [B, features_dim]."""

    def __init__(self, observation_space: spaces.Dict, features_dim: int = 256) -> None:
        super().__init__(observation_space, features_dim)
        gh, gw = _shape(observation_space, "entropy")
        n_vec = sum(int(np.prod(_shape(observation_space, k))) for k in ("probs", "cls", "step"))
        self.cls_norm = nn.LayerNorm(_shape(observation_space, "cls")[0])
        self.ink = INK in observation_space.spaces
        self.maps = nn.Sequential(
            nn.Conv2d(3 if self.ink else 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * gh * gw, 128),
            nn.ReLU(),
        )
        self.vec = nn.Sequential(nn.Linear(n_vec, 128), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(256, features_dim), nn.ReLU())
        self.budget = (
            float(observation_space["step"].high.max()) if isinstance(observation_space["step"], spaces.Box) else 1.0
        )

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        visited = obs["visited"].float()
        ent = obs["entropy"].float() * (1 - visited)
        ent = ent / ent.flatten(1).amax(dim=1).clamp(min=1e-6)[:, None, None]
        planes = [ent, visited, obs[INK].float()] if self.ink else [ent, visited]
        maps = self.maps(torch.stack(planes, dim=1))
        vec = torch.cat(
            [obs["probs"].float(), self.cls_norm(obs["cls"].float()), obs["step"].float().flatten(1) / self.budget],
            dim=1,
        )
        return self.out(torch.cat([maps, self.vec(vec)], dim=1))


POLICY_KWARGS: dict[str, Any] = dict(
    features_extractor_class=BeliefExtractor,
    features_extractor_kwargs=dict(features_dim=256),
    net_arch=dict(pi=[256], vf=[256]),
)


def policy_class(
    continuous: bool,
) -> type[MultiInputActorCriticPolicy] | type[MaskableMultiInputActorCriticPolicy]:
    """The policy class of avex's PPO: SB3's for continuous (y, x, z) actions, sb3-contrib's maskable one for
    discrete glimpse positions (both are what ``"MultiInputPolicy"`` names in PPO and MaskablePPO)."""
    if continuous:
        return MultiInputActorCriticPolicy
    from sb3_contrib.common.maskable.policies import MaskableMultiInputActorCriticPolicy

    return MaskableMultiInputActorCriticPolicy


def build_policy(
    observation_space: spaces.Space[Any], action_space: spaces.Space[Any], ink: bool = False
) -> BasePolicy:
    """A fresh (untrained) policy for an env's spaces: maskable for discrete actions, plain for (y, x, z); with
    ``ink`` it also reads the ink map (:data:`agents.belief.INK`).

    Raises:
        ValueError: the observation space is not an avex env's Dict with the keys the policy reads.
    """
    continuous = isinstance(action_space, spaces.Box)
    space = belief_space(observation_space, ink)
    return policy_class(continuous)(space, action_space, lambda _: 0.0, **POLICY_KWARGS)


def save_policy(policy: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` (policy weights) and ``path.json`` (what rebuilds it)."""
    weights = Path(path).with_suffix(".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_model(policy, str(weights))  # handles the feature extractor shared by actor and critic
    weights.with_suffix(".json").write_text(json.dumps(dict(format=FORMAT, **meta), indent=2, default=str))
    return weights
