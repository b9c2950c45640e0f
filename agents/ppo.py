"""A PPO glimpse policy (stable-baselines3 / sb3-contrib) acting on the environment's belief.

Policies are saved as safetensors + JSON (never unpickled) and rebuilt from the env's spaces when
loaded (:mod:`agents.sb3_policy`); a MaskablePPO / PPO ``.zip`` saved by ``model.save`` loads too when it
has avex's architecture (:mod:`agents.sb3_zip`: its pickled fields are never decoded, its weights read
tensors-only). Training is :func:`agents.ppo_train.train_ppo`. stable-baselines3 is imported only when a
policy is loaded, so listing the agents stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gymnasium import spaces

from agents.adapters import PredictAgent
from agents.base import register_agent
from avex.checkpoint import SHIPPED_POLICIES, SHIPPED_PREFIX, is_shipped, resolve_file
from avex.checks import brief
from avex.safeload import read_header, read_json

if TYPE_CHECKING:  # stable-baselines3 is imported only when a policy is built
    from stable_baselines3.common.policies import BasePolicy

__all__ = ["DEFAULT_POLICY", "PPOAgent", "policy_file", "shipped_for_k"]

DEFAULT_POLICY = "shipped:fashion-mnist"


def policy_file(ref: Any, name: str = "policy") -> Path:
    """The file a policy reference names (a MaskablePPO / PPO ``.zip`` as given; otherwise an avex ``.safetensors``
    policy, with or without its suffix, or ``shipped:<name>``), checked to exist before anything is built.

    Raises:
        ValueError: not a reference, or an unknown shipped name; FileNotFoundError: no such file. Both name ``name``.
    """
    if not isinstance(ref, (str, os.PathLike)) or not str(ref):
        raise ValueError(f"{name} must be a policy file or 'shipped:<name>', got {brief(ref)}")
    text = str(ref)
    try:
        file = Path(text) if Path(text).suffix == ".zip" else resolve_file(text, policy=True)
    except (ValueError, FileNotFoundError) as err:  # an unknown or missing shipped name: say which argument
        raise type(err)(f"{name} {text!r}: {err}") from err
    if not file.is_file():
        raise FileNotFoundError(
            f"{name} {text!r}: no policy file {str(file)!r}; pass an avex .safetensors policy (its .json beside it), "
            "a MaskablePPO / PPO .zip, or 'shipped:fashion-mnist'"
        )
    return file


@register_agent("ppo")
class PPOAgent(PredictAgent):
    """A trained PPO policy acting deterministically (mode of its action distribution) on the belief keys (and the
    ink map, for a policy trained with it), with the action masks in discrete mode (sb3-contrib's maskable policy).
    """

    def __init__(self, policy: BasePolicy, meta: dict[str, Any] | None = None) -> None:
        super().__init__(policy.eval())
        self.policy = policy
        self.meta = meta or {}

    @classmethod
    def from_env(cls, env: Any, *, seed: int = 0, policy: str | None = None, device: str = "cpu") -> PPOAgent:
        """The policy ``policy`` (default :data:`DEFAULT_POLICY`) for ``env``; a shipped name resolves to the
        shipped specialist for the env's split point where there is one (:func:`shipped_for_k`)."""
        return cls.load(shipped_for_k(policy or DEFAULT_POLICY, env), env, device=device)

    @classmethod
    def load(cls, path: str | Path, env: Any, device: str = "cpu") -> PPOAgent:
        """Rebuild a saved policy for an env (single or vector) whose spaces it must fit.

        Args:
            path: ``.safetensors`` with its ``.json``, or ``"shipped:fashion-mnist"``; or a ``.zip`` saved by
                MaskablePPO / PPO's ``model.save()`` with avex's architecture (``"MultiInputPolicy"``,
                ``policy_kwargs=agents.sb3_policy.POLICY_KWARGS``, on the belief keys). A ``.zip`` is read
                without unpickling anything: its ``data`` as plain JSON (pickled fields never decoded), its
                ``policy.pth`` with ``torch.load(weights_only=True)``, the one reader of a non-safetensors
                policy, which reads tensors only (:mod:`agents.sb3_zip`).

        Raises:
            FileNotFoundError: the policy or its JSON is missing.
            ValueError: not an avex PPO policy (not safetensors, a bad JSON, another format; a ``.zip`` with
                another architecture, or with pickled objects in its weights), or one that does not fit the
                env's spaces. The weights are read by safetensors only, never unpickled.
        """
        u = env.unwrapped if hasattr(env, "unwrapped") else env
        obs_space = getattr(u, "single_observation_space", u.observation_space)
        act_space = getattr(u, "single_action_space", u.action_space)
        if isinstance(path, (str, Path)) and Path(path).suffix == ".zip":
            from agents.sb3_zip import load_sb3_zip

            policy, meta = load_sb3_zip(path, obs_space, act_space)
        else:
            policy, meta = _load_safetensors(path, obs_space, act_space)
        return cls(policy.to(device), meta)


def shipped_for_k(policy: str | Path, env: Any) -> str | Path:
    """``"shipped:<name>-k<K>"`` where the env runs at split point K and such a policy is shipped, else ``policy``.

    A glimpse policy is trained at one K (the classifier's belief differs with K); the shipped set holds one per K
    where a specialist measured better than the default policy there (``benchmarks/RESULTS.md`` section 2).
    """
    if not (isinstance(policy, str) and is_shipped(policy)):
        return policy
    K = getattr(getattr(env, "unwrapped", env), "K", None)
    specialist = f"{policy}-k{K}"
    return specialist if specialist[len(SHIPPED_PREFIX) :] in SHIPPED_POLICIES else policy


def _load_safetensors(
    path: str | Path, obs_space: spaces.Space[Any], act_space: spaces.Space[Any]
) -> tuple[BasePolicy, dict[str, Any]]:
    """An avex policy file (safetensors + JSON) rebuilt for the env's spaces; see :meth:`PPOAgent.load`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from agents.sb3_policy import FORMAT, build_policy

    weights = resolve_file(path, policy=True)
    read_header(weights, "PPO policy")  # a regular safetensors file, before anything is built
    meta = read_json(weights.with_suffix(".json"), "PPO policy config")
    ink = meta.get("ink", False)  # policies saved before the ink map have no such field
    if meta.get("format") != FORMAT or not isinstance(meta.get("continuous"), bool) or not isinstance(ink, bool):
        raise ValueError(
            f"{weights.with_suffix('.json')} is not an avex PPO policy "
            f"(format {meta.get('format')!r}, expected {FORMAT!r}, with 'continuous' and, if present, 'ink': "
            "true or false)"
        )
    if isinstance(act_space, spaces.Box) != meta["continuous"]:
        trained = "continuous" if meta["continuous"] else "discrete"
        raise ValueError(f"policy {weights} was trained for {trained} actions; this env's are {act_space}")
    policy = build_policy(obs_space, act_space, ink)
    try:
        load_model(policy, str(weights), strict=True)
    except (RuntimeError, SafetensorError) as err:
        raise ValueError(
            f"policy {weights} does not fit this env's spaces (trained on {meta.get('env_id')} "
            f"with {meta.get('num_actions')} actions; this env has {getattr(act_space, 'n', act_space)}): {err}"
        ) from err
    return policy, meta
