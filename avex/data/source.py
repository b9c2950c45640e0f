"""The interface every canvas source implements: :class:`CanvasSource`.

A canvas source holds the hidden images an agent explores glimpse by glimpse. Environments draw
canvases with :meth:`CanvasSource.sample` (one numpy generator per row, so a row never depends on
the batch it is drawn in); training draws them with :meth:`CanvasSource.random_batch` (one torch
generator for a global batch, of which each DDP rank materialises only its slice).

Shapes: ``B`` batch rows, ``H, W, C`` canvas height/width/channels. Canvases are always
``uint8 [B, H, W, C]`` and labels ``int64 [B]``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["CanvasSource"]

_SEED_HIGH = torch.iinfo(torch.int64).max  # exclusive bound of the per-row seeds random_batch draws


class CanvasSource(abc.ABC):
    """What an environment or a training loop needs from a source of hidden canvases.

    Attributes:
        device: where :meth:`sample` and :meth:`random_batch` return canvases and labels.
    """

    device: torch.device
    #: True where canvases are decoded from files on the host: training then reads them ahead on threads.
    decodes_on_host: bool = False

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Number of classes (labels lie in ``0..num_classes-1``)."""

    @property
    @abc.abstractmethod
    def class_names(self) -> list[str]:
        """Human-readable class names, one per label."""

    @property
    @abc.abstractmethod
    def canvas_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of items (``N``) in the split."""

    @abc.abstractmethod
    def sample(
        self, rngs: Sequence[np.random.Generator], indices: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Draw one canvas per row, row ``i`` using only ``rngs[i]``.

        Args:
            rngs: one numpy Generator per row (so a row's draws do not depend on the batch).
            indices: optional item index per row; ``None`` entries (or ``indices=None``) draw one.

        Returns:
            canvases uint8 ``[B, H, W, C]`` and labels int64 ``[B]`` on the source's device,
            and the item indices used, int64 ``[B]``.
        """

    @abc.abstractmethod
    def to(self, device: str | torch.device) -> CanvasSource:
        """Return canvases on ``device`` from now on; returns self."""

    def random_batch(
        self, batch: int, generator: torch.Generator, part: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a global training batch of ``batch`` items and return only its rows ``part``.

        Every DDP rank calls this with the same seeded ``generator`` and its own ``part``: the
        generator advances identically everywhere, and rank ``r`` loads only rows ``part`` of the one
        global draw. Rows of a ``part`` equal the same rows of ``part=None``.

        This default draws, on the generator's device, one item index and one seed per row of the
        global batch, then loads only the rows of ``part`` with :meth:`sample` (each row with a numpy
        generator seeded by its drawn seed, so an unreadable image is redrawn the same way on every run).

        Args:
            batch: global batch size ``B``.
            generator: a seeded ``torch.Generator`` (any device).
            part: the rows to return (``None``: all ``B``).

        Returns:
            canvases uint8 ``[b, H, W, C]`` and labels int64 ``[b]`` on the source's device, where
            ``b`` is the number of rows in ``part``.
        """
        rows = _check_part(part)
        index = torch.randint(0, len(self), (batch,), generator=generator, device=generator.device)
        seed = torch.randint(0, _SEED_HIGH, (batch,), generator=generator, device=generator.device)
        # Only this part's rows cross to the host (one sync), and only they are decoded.
        rngs = [np.random.default_rng(s) for s in seed[rows].tolist()]
        indices: list[int | None] = list(index[rows].tolist())
        canvases, labels, _ = self.sample(rngs, indices)
        return canvases, labels


def _check_part(part: slice | None) -> slice:
    """``part`` as a slice of batch rows (``None``: all rows).

    Raises:
        TypeError: ``part`` is neither a slice nor None.
    """
    if part is None:
        return slice(None)
    if not isinstance(part, slice):
        raise TypeError(f"part must be a slice of batch rows or None, got {type(part).__name__}")
    return part


def _check_indices(rngs: Sequence[np.random.Generator], indices: Sequence[int | None] | None) -> list[int | None]:
    """``indices`` as a list with one entry per generator (``None``: draw every row's item).

    Raises:
        ValueError: ``indices`` and ``rngs`` differ in length.
    """
    if indices is None:
        return [None] * len(rngs)
    if len(indices) != len(rngs):
        raise ValueError(f"got {len(indices)} indices for {len(rngs)} rngs")
    return list(indices)
