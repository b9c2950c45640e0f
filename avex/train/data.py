"""All the data a training run reads, behind :func:`load_train_data`.

The rest of the trainer sees a :class:`TrainData`: class names, the number of training images, this
rank's part of each global batch (:meth:`TrainData.next_batch`) and the evaluation set (rank 0). Which
data set a config names, and how it is read, is decided here only.

* Fashion-MNIST: canvases composed on the device for the global batch from the step's generator.
* Image folders and ImageNet: a DataLoader per rank over the rank's slice of global batches drawn from
  per-epoch permutations seeded by (seed, epoch); horizontal flips drawn for the global batch.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch

from avex.data import FashionMNISTCanvas, ImageFolderCanvas, imagenet_canvas
from avex.train.config import TrainConfig, need
from avex.train.evaluate import EVAL_SEED

__all__ = [
    "FolderImages",
    "GlobalBatchSampler",
    "TrainData",
    "eval_batches",
    "fashion_eval_set",
    "fashion_mnist_canvases",
    "folder_sources",
    "load_train_data",
]

Batch = tuple[torch.Tensor, torch.Tensor]  # canvases uint8 [B, H, W, C], labels int64 [B]
EvalData: TypeAlias = Batch | ImageFolderCanvas  # composed canvases, or an image source read per batch


class TrainData(ABC):
    """A run's training stream and, on rank 0, its evaluation set (None on the other ranks)."""

    class_names: list[str]
    num_train: int  # training images (an epoch)
    batch_size: int  # the global batch
    device: torch.device
    eval_set: EvalData | None

    @abstractmethod
    def next_batch(self, generator: torch.Generator, part: slice) -> Batch:
        """This rank's ``part`` of the next global batch, on the device; ``generator``: the step's device generator."""

    def eval_batches(self, batch_size: int, limit: int = 0) -> Iterator[Batch]:
        """Batches of the evaluation set on the device: its first ``limit`` images (0: all), always the same ones."""
        if self.eval_set is None:
            raise RuntimeError("only rank 0 holds the evaluation set")
        return eval_batches(self.eval_set, batch_size, self.device, limit)


def load_train_data(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> TrainData:
    """The data of a resolved config: Fashion-MNIST canvases, or an image folder / ImageNet through a DataLoader.

    The one place that maps a data set's name to how the trainer reads it. Only rank 0 holds an evaluation set.
    """
    if cfg.dataset == "fashion-mnist":
        return _FashionMNISTData(cfg, rank, device)
    return _FolderData(cfg, rank, world, device)


class _FashionMNISTData(TrainData):
    """Canvases composed on the device; the evaluation set: fixed test canvases, composed once."""

    def __init__(self, cfg: TrainConfig, rank: int, device: torch.device) -> None:
        img_size = need(cfg.img_size, "img_size")
        self.train = fashion_mnist_canvases("train", device, img_size, cfg.clutter, cfg.data_root)
        test = fashion_mnist_canvases("test", device, img_size, cfg.clutter, cfg.data_root) if rank == 0 else None
        if cfg.in_chans != 1:
            raise ValueError("Fashion-MNIST canvases have one channel: use --in-chans 1")
        self.class_names, self.num_train = self.train.class_names, len(self.train)
        self.batch_size, self.device = cfg.batch_size, device
        self.eval_set = None if test is None else fashion_eval_set(test, cfg.eval_size, device)

    def next_batch(self, generator: torch.Generator, part: slice) -> Batch:
        canvases, labels = self.train.random_batch(self.batch_size, generator)  # the global batch, on the device
        return canvases[part], labels[part]


class _FolderData(TrainData):
    """Images read by a DataLoader per rank; the evaluation set: the validation images (else the training ones)."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device) -> None:
        train, val = folder_sources(cfg, need(cfg.img_size, "img_size"), need(cfg.in_chans, "in_chans"))
        self.class_names, self.num_train = train.class_names, len(train)
        self.batch_size, self.device = cfg.batch_size, device
        self.eval_set = val if rank == 0 else None
        loader = torch.utils.data.DataLoader(
            FolderImages(train),
            batch_sampler=GlobalBatchSampler(len(train), cfg.batch_size, rank, world, cfg.seed),
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        self.batches = iter(loader)  # starts the workers now, before the model is built

    def next_batch(self, generator: torch.Generator, part: slice) -> Batch:
        canvases, labels = next(self.batches)
        canvases, labels = canvases.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        flip = (torch.rand(self.batch_size, generator=generator, device=self.device) < 0.5)[part]
        return torch.where(flip[:, None, None, None], canvases.flip(2), canvases), labels


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------


def fashion_mnist_canvases(
    split: str, device: torch.device | str, img_size: int, clutter: int, root: str | None = None
) -> FashionMNISTCanvas:
    """Fashion-MNIST canvases as AVE-FashionMNIST-v0 draws them, at any canvas size.

    The items are scaled by ``img_size // 56`` (112 px: x2, as the env) and the clutter fragments are 16 px
    (at most the scaled item's side).
    """
    scale = max(1, img_size // 56)
    return FashionMNISTCanvas(
        split=split,
        device=device,
        root=root,
        canvas_size=img_size,
        scale=scale,
        n_clutter=clutter,
        fragment=min(16, 28 * scale),
    )


def fashion_eval_set(source: FashionMNISTCanvas, size: int, device: torch.device) -> Batch:
    """Fixed test canvases: the first ``size`` items (0: all), each once, layouts from a fixed seed.

    Returns:
        canvases uint8 [n, H, W, C], labels int64 [n], on ``device``.
    """
    n = len(source) if size <= 0 else min(size, len(source))
    rng = np.random.default_rng(EVAL_SEED)
    lay = source.sample_layouts([rng] * n, list(range(n)))  # one generator, rows drawn in order
    canvases, labels = source.compose(lay)
    return canvases.to(device), labels.to(device)


# ----------------------------------------------------------------------------------------------
# Image folders and ImageNet
# ----------------------------------------------------------------------------------------------


class FolderImages(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Images of an ImageFolderCanvas by index: (uint8 [H, W, C], label). Unreadable files fall through to the next."""

    def __init__(self, source: ImageFolderCanvas) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.source)
        for k in range(min(n, 20)):
            i = (index + k) % n
            try:
                return torch.from_numpy(self.source.load(i)), int(self.source.targets[i])
            except Exception as err:  # PIL raises many types on bad files
                warnings.warn(f"skipping unreadable image {self.source.files[i]}: {err}", RuntimeWarning, stacklevel=2)
        raise RuntimeError(f"20 consecutive unreadable images from index {index} in {self.source.root}")


class GlobalBatchSampler:
    """Endless index batches: global batches of per-epoch permutations seeded by (seed, epoch); yields this rank's part.

    Every rank draws the same global batches, so together the ranks read each image once per epoch.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int) -> None:
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed

    def __iter__(self) -> Iterator[list[int]]:
        local = self.global_batch // self.world
        buf, epoch = np.empty(0, dtype=np.int64), 0
        while True:
            while len(buf) < self.global_batch:
                buf = np.concatenate([buf, np.random.default_rng([self.seed, epoch]).permutation(self.n)])
                epoch += 1
            idx, buf = buf[: self.global_batch], buf[self.global_batch :]
            yield idx[self.rank * local : (self.rank + 1) * local].tolist()


def folder_sources(cfg: TrainConfig, img_size: int, in_chans: int) -> tuple[ImageFolderCanvas, ImageFolderCanvas]:
    """(train, eval) sources for dataset 'folder' or 'imagenet'; the training images when there is no eval split."""
    tr, va = cfg.train_split or None, cfg.val_split or None
    val: ImageFolderCanvas | None
    if cfg.dataset == "imagenet":
        train = imagenet_canvas(cfg.data_root, split=tr, image_size=img_size)
        root = Path(cfg.data_root or os.environ.get("AVEX_IMAGENET", "")).expanduser()
        val = imagenet_canvas(cfg.data_root, split=va, image_size=img_size) if va and (root / va).is_dir() else None
    else:
        if cfg.data_root is None:
            raise ValueError("--dataset folder needs --data-root (a folder of class sub-folders)")
        root = Path(cfg.data_root).expanduser()
        if tr and not (root / tr).is_dir():
            tr = None  # no train/ sub-folder: the root holds the class folders
        train = ImageFolderCanvas(root, image_size=img_size, split=tr, in_chans=in_chans)
        val = (
            ImageFolderCanvas(root, image_size=img_size, split=va, classes=train.classes, in_chans=in_chans)
            if va and (root / va).is_dir()
            else None
        )
    if val is None:
        warnings.warn(f"no validation split {va!r} under {cfg.data_root}: evaluating on training images", stacklevel=2)
        val = train
    return train, val


def eval_batches(eval_data: EvalData, batch_size: int, device: torch.device, limit: int = 0) -> Iterator[Batch]:
    """Batches (canvases uint8 [B, H, W, C], labels [B]) on ``device`` of the first ``limit`` images (0: all).

    ``eval_data`` is a composed (canvases, labels) pair, or an image source: then a fixed random subset
    of ``limit`` images, read by a DataLoader.
    """
    if isinstance(eval_data, tuple):
        canvases, labels = eval_data
        n = len(labels) if limit <= 0 else min(limit, len(labels))
        for i in range(0, n, batch_size):
            yield canvases[i : min(i + batch_size, n)], labels[i : min(i + batch_size, n)]
        return
    n = len(eval_data) if limit <= 0 else min(limit, len(eval_data))
    order = np.sort(np.random.default_rng(EVAL_SEED).permutation(len(eval_data))[:n])  # fixed subset
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(FolderImages(eval_data), order.tolist()),
        batch_size=batch_size,
        num_workers=min(4, os.cpu_count() or 1),
    )
    for canvases, labels in loader:
        yield canvases.to(device, non_blocking=True), labels.to(device, non_blocking=True)
