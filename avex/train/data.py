"""All the data a training run reads, from the data-set registry (:data:`avex.data.DATASETS`).

One path for every data set: the run's :class:`~avex.data.DatasetSpec` builds the training and the
evaluation source, every step takes this rank's part of one global batch drawn by
:meth:`~avex.data.CanvasSource.random_batch` from the step's seeded generator, and horizontal flips
follow when the spec asks for them. Sources that decode files on the host (``decodes_on_host``) are
read ahead on ``--workers`` threads, each step from its own generator, so the batches do not depend
on the number of threads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from avex.data import CanvasSource, DatasetSpec, get_dataset
from avex.train.config import TrainConfig, need
from avex.train.evaluate import EVAL_SEED

__all__ = ["TrainData", "eval_batches", "load_train_data"]

Batch = tuple[torch.Tensor, torch.Tensor]  # canvases uint8 [B, H, W, C], labels int64 [B]


def load_train_data(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> TrainData:
    """The data of a resolved config; only rank 0 holds an evaluation source."""
    return TrainData(cfg, rank, world, device)


# Config fields that are data-set options where a data set declares them (Fashion-MNIST's clutter, a
# folder's channels); a value set for a data set that does not declare it is refused by the spec.
_OPTION_FIELDS = ("clutter", "in_chans")


def dataset_options(cfg: TrainConfig, spec: DatasetSpec) -> dict[str, Any]:
    """The data set's options, with the values the config sets.

    Raises:
        ValueError: ``--clutter`` given for a data set without clutter.
    """
    given = {k: getattr(cfg, k) for k in _OPTION_FIELDS if k in spec.options or k == "clutter"}
    return spec.resolve_options(given)


class TrainData:
    """A run's training stream (this rank's part of each global batch) and, on rank 0, its evaluation source.

    Attributes:
        class_names: one per label. num_train: training images (an epoch). options: the data set's options.
        eval_source: the evaluation split's source (rank 0), or the training one when there is none.
    """

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device) -> None:
        spec = get_dataset(cfg.dataset)
        self.spec, self.device, self.batch_size = spec, device, cfg.batch_size
        local = cfg.batch_size // world
        self.part = slice(rank * local, (rank + 1) * local)
        self.options = dataset_options(cfg, spec)
        self.train = self._train_source(cfg, _split(cfg.train_split, spec.train_split))
        self.class_names, self.num_train = self.train.class_names, len(self.train)
        channels = self.train.canvas_shape[2]
        if cfg.in_chans != channels:
            raise ValueError(f"{spec.name} canvases have {channels} channel(s): use --in-chans {channels}")
        self.eval_source: CanvasSource | None = None
        if rank == 0:
            self.eval_source = self._eval_source(cfg, _split(cfg.val_split, spec.eval_split))
        self.seed, self.workers = cfg.seed, cfg.workers
        self._pool = ThreadPoolExecutor(cfg.workers) if cfg.workers > 0 and self.train.decodes_on_host else None
        self._ahead: dict[int, Future[Batch]] = {}

    def _source(self, cfg: TrainConfig, split: str | None, **options: Any) -> CanvasSource:
        return self.spec.make_source(
            split=split,
            root=cfg.data_root,
            image_size=need(cfg.img_size, "img_size"),
            device=self.device,
            **{**self.options, **options},
        )

    def _train_source(self, cfg: TrainConfig, split: str | None) -> CanvasSource:
        try:
            return self._source(cfg, split)
        except FileNotFoundError:
            if split is None or not cfg.data_root:
                raise
            return self._source(cfg, None)  # no training sub-folder: the root holds the class folders

    def _eval_source(self, cfg: TrainConfig, split: str | None) -> CanvasSource:
        # A folder's labels follow its class list: the evaluation split must use the training split's.
        same_classes = {"classes": getattr(self.train, "classes", None)} if "classes" in self.spec.options else {}
        try:
            return self._source(cfg, split, **same_classes)
        except FileNotFoundError:
            if split is None:
                raise
            warnings.warn(
                f"no evaluation split {split!r} of {self.spec.name} under {cfg.data_root}: evaluating on training "
                f"images",
                stacklevel=2,
            )
            return self.train

    def next_batch(self, step: int, generator: torch.Generator) -> Batch:
        """This rank's part of global batch ``step``, on the device; then its flips, from ``generator``."""
        if self._pool is None:
            canvases, labels = self.train.random_batch(self.batch_size, generator, self.part)
        else:
            for ahead in range(step, step + 2 * self.workers):  # keep the threads busy on the next steps
                if ahead not in self._ahead:
                    self._ahead[ahead] = self._pool.submit(self._read, ahead)
            canvases, labels = (t.to(self.device, non_blocking=True) for t in self._ahead.pop(step).result())
        if self.spec.flip:  # drawn for the global batch, as every other draw of the step
            flip = (torch.rand(self.batch_size, generator=generator, device=self.device) < 0.5)[self.part]
            canvases = torch.where(flip[:, None, None, None], canvases.flip(2), canvases)
        return canvases, labels

    def _read(self, step: int) -> Batch:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, step, 1]).generate_state(1)[0]))
        return self.train.random_batch(self.batch_size, gen, self.part)

    def eval_batches(self, batch_size: int, limit: int = 0) -> Iterator[Batch]:
        """Batches of the evaluation source on the device: a fixed set of ``limit`` images (0: all)."""
        if self.eval_source is None:
            raise RuntimeError("only rank 0 holds the evaluation set")
        return eval_batches(self.eval_source, batch_size, self.device, limit)

    def close(self) -> None:
        """Stop the read-ahead threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _split(given: str | None, default: str | None) -> str | None:
    """The config's split: ``""`` means the root itself; None, the data set's."""
    if given is None:
        return default
    return given or None


def eval_batches(source: CanvasSource, batch_size: int, device: torch.device, limit: int = 0) -> Iterator[Batch]:
    """(canvases uint8 [b, H, W, C], labels int64 [b]) batches on ``device``: every image of ``source`` once,
    in order, or a fixed random subset of ``limit`` of them; the canvases' own draws (layouts, unreadable
    files) come from one generator seeded with :data:`EVAL_SEED`, so every run sees the same canvases."""
    n = len(source)
    order = (
        np.arange(n) if limit <= 0 or limit >= n else np.sort(np.random.default_rng(EVAL_SEED).permutation(n)[:limit])
    )
    rng = np.random.default_rng(EVAL_SEED)
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size].tolist()
        canvases, labels, _ = source.sample([rng] * len(rows), rows)
        yield canvases.to(device), labels.to(device)
