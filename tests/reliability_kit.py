"""Shared pieces of tests/test_reliability.py and tests/test_fuzz.py: tiny envs, image folders, checkpoints
and a snapshot of everything a refused call must leave unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from avex.checkpoint import save_tore
from avex.model import create_tore
from envs import AVEEnv, AVEVectorEnv
from envs.engine import AVEEngine

# A random depth-2, width-32 ViT: every model here is built in milliseconds.
TINY: dict[str, Any] = dict(
    checkpoint=None,
    pretrained=False,
    model="vit_tiny_patch16_224",
    model_kwargs=dict(depth=2, embed_dim=32, num_heads=2),
)
# Fashion-MNIST canvases of 112 px in 8 px patches: a 14 x 14 grid, 13 x 13 = 169 glimpse positions.
FM: dict[str, Any] = dict(dataset="fashion-mnist", split="train", patch=8, **TINY)


def fm_env(root: Path, **extra: Any) -> AVEEnv:
    """A tiny Fashion-MNIST env over the fake IDX files in ``root``."""
    return AVEEnv(root=str(root), **{**FM, **extra})


def fm_vector(root: Path, num_envs: int, **extra: Any) -> AVEVectorEnv:
    return AVEVectorEnv(num_envs=num_envs, root=str(root), **{**FM, **extra})


def folder_env(root: Path, **extra: Any) -> AVEEnv:
    """A tiny image-folder env: 32 px canvases in 8 px patches (4 x 4 grid)."""
    return AVEEnv(**{**dict(dataset="folder", root=str(root), image_size=32, patch=8, budget=4, **TINY), **extra})


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 48), fmt: str = "JPEG") -> Path:
    """A random RGB image of ``size`` = (W, H)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
    return path


def image_folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 1) -> Path:
    """``root/<class>/<i>.jpg``: ``per_class`` good images per class."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            write_image(root / name / f"{i}.jpg", seed=10 * c + i)
    return root


def tiny_checkpoint(path: Path) -> Path:
    """An avex checkpoint that fits :func:`fm_env` (112 px, patch 8, one channel, 10 classes)."""
    model = create_tore(
        "vit_tiny_patch16_224",
        img_size=112,
        patch_size=8,
        in_chans=1,
        num_classes=10,
        depth=2,
        embed_dim=32,
        num_heads=2,
    )
    return save_tore(model, path)


def snapshot(engine: AVEEngine, rngs: list[np.random.Generator | None] | None = None) -> dict[str, Any]:
    """Copies of every piece of episode state (and generator states) a refused call must not touch."""
    out: dict[str, Any] = {}
    for name, value in vars(engine).items():
        if isinstance(value, torch.Tensor):
            out[name] = value.clone()
        elif isinstance(value, np.ndarray):
            out[name] = value.copy()
    out["cache"] = (engine.cache.buf.clone(), engine.cache.coords.clone(), engine.cache.counts.copy())
    out["rngs"] = [None if r is None else repr(r.bit_generator.state) for r in rngs or []]
    return out


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key == "cache":
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and np.array_equal(x[2], y[2]), key
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=key)
        else:
            assert x == y, key
