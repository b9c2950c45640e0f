"""Environment ids and their defaults, registered with Gymnasium on ``import avex``.

Entry points are strings, resolved by Gymnasium only when an environment is made, so the core library
never imports ``envs`` (dependencies flow one way: envs -> avex). Keyword arguments stay plain data
(names, paths, sizes) because ``gym.make`` deep-copies them on every call; the model and the data are
shared through per-process caches (:func:`avex.checkpoint.shared_model`).
"""

from __future__ import annotations

from typing import Any

import gymnasium

__all__ = ["ENV_SPECS", "register_envs"]

_ENTRY = "envs.ave_env:AVEEnv"
_VECTOR_ENTRY = "envs.vector:AVEVectorEnv"

ENV_SPECS: dict[str, dict[str, Any]] = {
    # The embedded default: offline right after set-up, with the shipped checkpoint.
    "AVE-FashionMNIST-v0": dict(
        dataset="fashion-mnist",
        split="train",
        image_size=112,
        patch=8,
        glimpse=2,
        budget=12,
        clutter=4,
        checkpoint="shipped:fashion-mnist",
    ),
    # ImageNet-1k from a local folder (root= or AVEX_IMAGENET), DeiT-III-S as in TORE's ImageNet runs.
    "AVE-ImageNet-v0": dict(
        dataset="imagenet",
        split="val",
        image_size=224,
        patch=16,
        glimpse=2,
        budget=12,
        model="deit3_small_patch16_224",
        pretrained=True,
    ),
    # Any folder of class subfolders.
    "AVE-ImageFolder-v0": dict(
        dataset="folder",
        image_size=224,
        patch=16,
        glimpse=2,
        budget=12,
        model="vit_small_patch16_224",
        pretrained=True,
    ),
}


def register_envs() -> None:
    """Register every id in :data:`ENV_SPECS` (idempotent)."""
    for env_id, kwargs in ENV_SPECS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=_ENTRY, vector_entry_point=_VECTOR_ENTRY, kwargs=dict(kwargs))
