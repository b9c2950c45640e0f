"""Gymnasium ids, registered in one place: one id per data set in the registry that names one.

Each registered data set (:data:`avex.data.DATASETS`) with an ``env_id`` becomes a Gymnasium id whose
kwargs are that data set's defaults, plain data only (``gym.make`` deep-copies them on every call; the
model and the data are shared through per-process caches). Data sets registered later, from a user's
own file, get their id the moment they are registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium

from avex.checks import brief
from avex.data import DATASETS, DatasetSpec

__all__ = [
    "ENTRY_POINT",
    "VECTOR_ENTRY_POINT",
    "check_env_id",
    "check_env_kwargs",
    "env_kwargs",
    "env_ids",
    "register_envs",
]

ENTRY_POINT = "envs.ave_env:AVEEnv"
VECTOR_ENTRY_POINT = "envs.vector:AVEVectorEnv"
_subscribed = False


def env_kwargs(spec: DatasetSpec) -> dict[str, Any]:
    """The kwargs an id is registered with: the data set's env defaults.

    ``patch`` is None, not the data set's patch: a registered patch could not be told from one the user
    passed, and would rebuild any other timm model at it. With None the model keeps its own patch, and the
    data set's applies to its own model built from scratch (:attr:`envs.config.EnvConfig.resolved_patch`).
    """
    kwargs: dict[str, Any] = dict(
        dataset=spec.name,
        split=spec.env_split,
        image_size=spec.image_size,
        patch=None,
        glimpse=spec.glimpse,
        budget=spec.budget,
        model=spec.model,
        checkpoint=spec.checkpoint,
        pretrained=spec.pretrained,
    )
    kwargs.update(spec.options)
    return kwargs


def env_ids() -> dict[str, str]:
    """Registered data set name -> its Gymnasium id (data sets without one are left out)."""
    ids: dict[str, str] = {}
    for name in DATASETS.names():
        env_id = DATASETS.get(name).env_id
        if env_id:
            ids[name] = env_id
    return ids


def check_env_id(env_id: Any, name: str = "env_id") -> str:
    """``env_id`` if it names a registered avex environment (any id registered with :data:`ENTRY_POINT`: those of
    :func:`env_ids` and a user's own).

    Raises:
        ValueError: naming ``name``, the value and the registered avex ids (another env has no split, model or K).
    """
    spec = gymnasium.registry.get(env_id) if isinstance(env_id, str) else None
    if spec is None or spec.entry_point != ENTRY_POINT:
        known = sorted(k for k, v in gymnasium.registry.items() if v.entry_point == ENTRY_POINT)
        raise ValueError(f"{name} must be an avex environment, one of {known}, got {brief(env_id)}")
    return env_id


def check_env_kwargs(value: Any, own: Mapping[str, str]) -> dict[str, Any]:
    """``--env-kwargs`` of a command that sets some env kwargs itself: a dict of names without those.

    Args:
        value: the kwargs (the JSON object as read by :func:`avex.options.json_object`, or a config's dict).
        own: the kwargs the command sets itself, each with what to do instead (the flag that sets it).

    Raises:
        ValueError: not an object of names, or one of ``own`` given, named with its value and the fix.
    """
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"--env-kwargs must be a JSON object such as '{{\"K\": 3}}', got {brief(value)}")
    for key, fix in own.items():
        if key in value:
            raise ValueError(f"--env-kwargs sets {key}={brief(value[key])}: {fix}")
    return value


def _register(name: str, spec: DatasetSpec) -> None:
    if spec.env_id and spec.env_id not in gymnasium.registry:
        gymnasium.register(
            spec.env_id, entry_point=ENTRY_POINT, vector_entry_point=VECTOR_ENTRY_POINT, kwargs=env_kwargs(spec)
        )


def register_envs() -> None:
    """Register an id for every data set, now and whenever one is registered later (idempotent)."""
    global _subscribed
    if not _subscribed:
        _subscribed = True
        DATASETS.subscribe(_register)
