"""The data-set registry: one :class:`DatasetSpec` per data set, with how to build it and its defaults.

Every per-data-set fact (canvas size, patch, split names, default model and checkpoint, training
architecture and learning rate, data-set-specific options) lives in the data set's spec, registered
next to its canvas source (:mod:`avex.data.cluttered`, :mod:`avex.data.imagenet`, :mod:`avex.data.folder`).
The envs, training and the CLI read :data:`DATASETS` instead of keeping their own tables::

    spec = get_dataset("fmnist")                      # aliases resolve; unknown names raise ValueError
    source = spec.make_source(root=folder)            # env split, canvas size and options filled in
    source = spec.make_source(split="test", clutter=0)

A new data set registers itself in its own module with :func:`register_dataset`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avex.checks import brief
from avex.data.source import CanvasSource
from avex.registry import Registry

__all__ = ["DATASETS", "DatasetSpec", "canvas_hw", "get_dataset", "register_dataset"]


def canvas_hw(image_size: Any) -> tuple[int, int]:
    """A canvas size as ``(H, W)``: one int is a square.

    Raises:
        ValueError: not a positive int or a pair (tuple or list) of positive ints.
    """
    if isinstance(image_size, (int, np.integer)):
        sizes: tuple[Any, ...] = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)):
        sizes = tuple(image_size)
    else:
        sizes = ()
    # bool is an int but never a size.
    if len(sizes) != 2 or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ValueError(f"image_size must be a positive int or (H, W), got {brief(image_size)}")
    return int(sizes[0]), int(sizes[1])


@dataclass(frozen=True)
class DatasetSpec:
    """Everything avex needs to know about one data set: how to build its canvases and its defaults.

    Attributes:
        name: registered name, e.g. ``"fashion-mnist"``.
        build: ``build(split=, root=, image_size=(H, W), device=, cache_images=, **options) -> CanvasSource``;
            called by :meth:`make_source` with every option filled in.
        env_id: Gymnasium id the envs register for it, e.g. ``"AVE-FashionMNIST-v0"``.
        image_size: canvas side, or ``(H, W)`` (env and training default).
        patch: ViT patch side in pixels: training's default, and the env's for :attr:`model` built from scratch
            (any other model, hub weights or checkpoint keeps its own patch in the env).
        glimpse: glimpse side in patches (env default).
        budget: glimpses per episode (env default).
        env_split: split the env reads by default (None: the root itself).
        train_split: split training learns from.
        eval_split: split training evaluates on.
        model: default timm model name (env and training).
        checkpoint: default env checkpoint (``"shipped:<name>"``, a path, or None).
        pretrained: env default: timm hub weights from the local cache.
        train_model: training architecture defaults (``in_chans``, ``depth``, ``embed_dim``, ``num_heads``,
            ``mean``, ``std``), in :class:`avex.train.TrainConfig`'s field names.
        lr: training peak learning rate default.
        flip: random horizontal flips in training.
        options: data-set-specific keyword arguments of ``build`` and their defaults (``{"clutter": 4}``).
        needs_root: ``root=`` is required (no default location).
        aliases: other names that resolve to this one.
        description: one line for listings and error messages.
    """

    name: str
    build: Callable[..., CanvasSource]
    env_id: str | None = None
    image_size: int | tuple[int, int] = 224
    patch: int = 16
    glimpse: int = 2
    budget: int = 12
    env_split: str | None = None
    train_split: str | None = "train"
    eval_split: str | None = "val"
    model: str = "vit_small_patch16_224"
    checkpoint: str | None = None
    pretrained: bool = False
    train_model: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-4
    flip: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    needs_root: bool = False
    aliases: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        canvas_hw(self.image_size)  # fail at registration, not at the first make_source

    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Every declared option, ``options`` over the defaults (a None value counts as not given).

        Raises:
            ValueError: an option this data set does not declare (the message names it).
        """
        given = {key: value for key, value in options.items() if value is not None}
        if unknown := sorted(set(given) - set(self.options)):
            declared = sorted(self.options) or "none"
            raise ValueError(f"option(s) {unknown} do not apply to data set {self.name!r} (its options: {declared})")
        return {**self.options, **given}

    def make_source(
        self,
        split: str | None = None,
        root: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
        cache_images: bool = False,
        **options: Any,
    ) -> CanvasSource:
        """Build this data set's canvas source, filling in the defaults.

        Args:
            split: split / sub-folder; None: :attr:`env_split`; ``""``: the root itself.
            root: data folder (None: the data set's default location; required when :attr:`needs_root`).
            image_size: canvas side or ``(H, W)``; None: :attr:`image_size`.
            device: where canvases ``uint8 [B, H, W, C]`` and labels ``int64 [B]`` are returned.
            cache_images: keep decoded images in memory (sources that decode files).
            **options: data-set-specific arguments (see :attr:`options`); None values take the default.

        Raises:
            ValueError: a missing required root, a bad image size, or an option this data set does not declare.
        """
        if self.needs_root and root is None:
            raise ValueError(f"dataset {self.name!r} needs root= ({self.description})")
        return self.build(
            split=self.env_split if split is None else split,
            root=root,
            image_size=canvas_hw(self.image_size if image_size is None else image_size),
            device=device,
            cache_images=cache_images,
            **self.resolve_options(options),
        )

    def train_defaults(self) -> dict[str, Any]:
        """Training defaults in :class:`avex.train.TrainConfig`'s field names (model, img_size, patch, lr, ...)."""
        return dict(
            model=self.model,
            img_size=self.image_size,
            patch=self.patch,
            glimpse=self.glimpse,
            budget=self.budget,
            **self.train_model,
            lr=self.lr,
        )


DATASETS: Registry[DatasetSpec] = Registry("data set")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` under its name and aliases; returns it.

    Raises:
        ValueError: the name or an alias is taken by another spec.
    """
    return DATASETS.register(spec.name, spec, aliases=spec.aliases)


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered under ``name`` or one of its aliases.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    return DATASETS.get(name)
