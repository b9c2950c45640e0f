"""Cluttered Fashion-MNIST canvases (``AVE-FashionMNIST-v0``), composed in batch on any device.

A 28x28 Fashion-MNIST item is scaled x2 and dropped at a random spot of a black 112x112 canvas,
together with a few 16x16 "clutter" fragments cut from other items. A canvas is fully described by
its integer :class:`CanvasLayout`; composition is :func:`avex.data.compose.compose_canvases` (one Triton kernel
launch on CUDA, batched torch indexing elsewhere). This module also registers the ``"fashion-mnist"`` data set,
next to the source its spec builds.

Shapes: ``B`` batch rows, ``N`` items in a split, ``n`` clutter fragments per canvas, ``S`` the
scaled item's side, ``F`` the fragment side. Canvases are ``uint8 [B, H, W, 1]``, labels ``int64 [B]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from avex.checks import check_int
from avex.data.compose import Placements, compose_canvases
from avex.data.fashion_mnist import _ITEM_SIDE, FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, load_fashion_mnist
from avex.data.registry import DatasetSpec, register_dataset
from avex.data.source import CanvasSource, _check_indices, _check_part
from avex.transfer import to_device

__all__ = ["CanvasLayout", "FashionMNISTCanvas"]


@dataclass
class CanvasLayout:
    """Integer parameters of ``B`` Fashion-MNIST canvases (numpy int64 arrays).

    Attributes:
        index: ``[B]`` item shown (and classified).
        item_yx: ``[B, 2]`` top-left corner of the scaled item on the canvas.
        clutter_index: ``[B, n]`` items the clutter fragments are cut from (never ``index``).
        clutter_src_yx: ``[B, n, 2]`` top-left of each fragment inside its *scaled* item.
        clutter_dst_yx: ``[B, n, 2]`` top-left of each fragment on the canvas.
    """

    index: np.ndarray
    item_yx: np.ndarray
    clutter_index: np.ndarray
    clutter_src_yx: np.ndarray
    clutter_dst_yx: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def stack(cls, layouts: Sequence[CanvasLayout]) -> CanvasLayout:
        """Concatenate layouts along the batch axis."""
        if not layouts:
            raise ValueError("cannot stack an empty list of layouts")
        return cls(*(np.concatenate([getattr(lay, f.name) for lay in layouts]) for f in fields(cls)))

    def row(self, i: int) -> CanvasLayout:
        """Row ``i`` as a one-row layout."""
        return CanvasLayout(*(getattr(self, f.name)[i : i + 1] for f in fields(self)))


def _fragment_src_range(item_size: int, fragment: int) -> tuple[int, int]:
    """Inclusive range of a fragment's top-left inside a scaled item.

    Restricted to the central region (a margin of ``item_size // 7`` on each side:
    the central 40x40 of a 56x56 item), where Fashion-MNIST items have ink, so
    fragments are rarely all black.
    """
    margin = item_size // 7
    if item_size - 2 * margin < fragment:
        margin = (item_size - fragment) // 2
    return margin, item_size - margin - fragment


class FashionMNISTCanvas(CanvasSource):
    """Fashion-MNIST items on a larger cluttered canvas (``AVE-FashionMNIST-v0``).

    Each canvas is black (``canvas_size`` square, 1 channel) with the item scaled by
    ``scale`` (nearest neighbour) at a uniformly random position, plus
    ``n_clutter`` ``fragment``-sized patches cut from other random items of the
    same split (also scaled), at uniformly random positions, merged with a
    pixel-wise max.

    Args:
        split: ``"train"`` or ``"test"``.
        root: folder of the IDX files (``None``: see :func:`fashion_mnist_dirs`).
        canvas_size: canvas side in pixels.
        scale: integer upscaling of the 28x28 items.
        n_clutter: clutter fragments per canvas (0 disables clutter).
        fragment: clutter fragment side in pixels.
        device: where images live and canvases are composed.
    """

    def __init__(
        self,
        split: str = "train",
        root: str | Path | None = None,
        canvas_size: int = 112,
        scale: int = 2,
        n_clutter: int = 4,
        fragment: int = 16,
        device: str | torch.device = "cpu",
    ) -> None:
        canvas_size = check_int("canvas_size", canvas_size, 1)
        scale = check_int("scale", scale, 1)
        self.item_size = _ITEM_SIDE * scale
        if canvas_size < self.item_size:
            raise ValueError(f"canvas_size={canvas_size} is smaller than the scaled item ({self.item_size})")
        fragment = check_int("fragment", fragment, 1, self.item_size, " (the scaled item's side)")
        # Every fragment costs a pass over the batch at each reset: more than tile the canvas only cover
        # each other (clutter=10**5 took 30 s per reset).
        tiles = (canvas_size // fragment) ** 2
        n_clutter = check_int(
            "n_clutter (the env's clutter)",
            n_clutter,
            0,
            tiles,
            f" (the {fragment} px fragments that tile a {canvas_size} px canvas)",
        )
        images, labels = load_fashion_mnist(split, root)
        if n_clutter and len(images) < 2:
            raise ValueError("clutter needs at least 2 items (fragments come from other items)")
        self.split = split
        self.canvas_size = canvas_size
        self.scale = scale
        self.n_clutter = n_clutter
        self.fragment = fragment
        self._src_lo, self._src_hi = _fragment_src_range(self.item_size, fragment)
        self.device = torch.device(device)
        with warnings.catch_warnings():
            # The cached arrays are read-only; share their memory on CPU instead of copying 47 MB.
            warnings.simplefilter("ignore", UserWarning)
            self.images = torch.from_numpy(images).to(self.device)  # uint8 [N, 28, 28]
            self.labels = torch.from_numpy(labels).to(self.device)  # int64 [N]

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (
            f"FashionMNISTCanvas(split={self.split!r}, items={len(self)}, canvas_size={self.canvas_size}, "
            f"scale={self.scale}, n_clutter={self.n_clutter}, fragment={self.fragment}, device={self.device})"
        )

    @property
    def num_classes(self) -> int:
        return len(FASHION_MNIST_CLASSES)

    @property
    def class_names(self) -> list[str]:
        return list(FASHION_MNIST_CLASSES)

    @property
    def canvas_shape(self) -> tuple[int, int, int]:
        return (self.canvas_size, self.canvas_size, 1)

    def to(self, device: str | torch.device) -> FashionMNISTCanvas:
        """Move the item store to ``device`` (in place); returns self."""
        self.device = torch.device(device)
        self.images = self.images.to(self.device)
        self.labels = self.labels.to(self.device)
        return self

    # -- layouts -------------------------------------------------------------

    def sample_layout(self, rng: np.random.Generator, index: int | None = None) -> CanvasLayout:
        """Draw the layout of one canvas from ``rng`` (one row of :meth:`sample_layouts`)."""
        return self.sample_layouts([rng], [index])

    def sample_layouts(
        self, rngs: Sequence[np.random.Generator], indices: Sequence[int | None] | None = None
    ) -> CanvasLayout:
        """Draw one layout per generator: row ``i`` uses ``rngs[i]`` only (so a row does not depend on the batch).

        Each row takes ONE call, ``rngs[i].random(3 + 5 * n_clutter)``, whose uniforms are mapped to integers
        for all rows at once (``floor(u * m)``: uniform on ``0..m-1`` up to 2**-53). One call per row
        instead of one per field is what makes autoresetting 16k envs cheap (a Python-level numpy call
        costs microseconds). Uniforms in order: item index (always drawn, then replaced by the given index,
        so positions do not depend on whether the item was fixed), item top-left ``(y, x)``, clutter item
        indices, fragment top-lefts inside their items, fragment top-lefts on the canvas.

        Args:
            rngs: B numpy generators.
            indices: optional item index per row (None entries: drawn).

        Returns:
            A :class:`CanvasLayout` of B rows.
        """
        fixed = None if indices is None else _check_indices(rngs, indices)  # None: no per-row loop below
        n, N, B = self.n_clutter, len(self), len(rngs)
        u = np.empty((B, 3 + 5 * n))
        for u_row, rng in zip(u, rngs):  # written in place: a third faster than stacking B arrays at 16k rows
            rng.random(out=u_row)

        def ints(cols: np.ndarray, lo: int, hi_inclusive: int) -> np.ndarray:
            return lo + np.floor(cols * (hi_inclusive - lo + 1)).astype(np.int64)

        index = ints(u[:, 0], 0, N - 1)
        for row, i in enumerate(fixed or ()):
            if i is not None:
                if not 0 <= i < N:
                    raise IndexError(f"index {i} out of range for {N} items")
                index[row] = i
        item_yx = ints(u[:, 1:3], 0, self.canvas_size - self.item_size)
        # Uniform over the other N-1 items: draw in [0, N-1) and skip over `index`.
        clutter = ints(u[:, 3 : 3 + n], 0, max(N - 2, 0))
        clutter += clutter >= index[:, None]
        src = ints(u[:, 3 + n : 3 + 3 * n], self._src_lo, self._src_hi).reshape(B, n, 2)
        dst = ints(u[:, 3 + 3 * n :], 0, self.canvas_size - self.fragment).reshape(B, n, 2)
        return CanvasLayout(index=index, item_yx=item_yx, clutter_index=clutter, clutter_src_yx=src, clutter_dst_yx=dst)

    def _check_layout(self, lay: CanvasLayout) -> None:
        # Checked on the host: an out-of-range index on CUDA is an opaque device assert.
        B, n, N = len(lay), self.n_clutter, len(self)
        shapes = {
            "index": (B,),
            "item_yx": (B, 2),
            "clutter_index": (B, n),
            "clutter_src_yx": (B, n, 2),
            "clutter_dst_yx": (B, n, 2),
        }
        for name, shape in shapes.items():
            if getattr(lay, name).shape != shape:
                raise ValueError(f"layout.{name} has shape {getattr(lay, name).shape}, expected {shape}")

        def check(name: str, lo: int, hi: int) -> None:
            a = getattr(lay, name)
            if a.size and (a.min() < lo or a.max() > hi):
                raise ValueError(f"layout.{name} must lie in [{lo}, {hi}], got [{a.min()}, {a.max()}]")

        check("index", 0, N - 1)
        check("item_yx", 0, self.canvas_size - self.item_size)
        check("clutter_index", 0, N - 1)
        check("clutter_src_yx", 0, self.item_size - self.fragment)
        check("clutter_dst_yx", 0, self.canvas_size - self.fragment)

    def compose(self, layouts: CanvasLayout | Sequence[CanvasLayout]) -> tuple[torch.Tensor, torch.Tensor]:
        """Render layouts into canvases (batched on ``self.device``).

        Args:
            layouts: a (stacked) :class:`CanvasLayout` of ``B`` rows, or a list of them.

        Returns:
            canvases uint8 ``[B, H, W, 1]`` and labels int64 ``[B]``.
        """
        lay = layouts if isinstance(layouts, CanvasLayout) else CanvasLayout.stack(layouts)
        self._check_layout(lay)
        return self._send_and_compose(lay)

    def _send_and_compose(self, lay: CanvasLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`compose` of a layout known to be valid (checked, or drawn by :meth:`sample_layouts`)."""
        # One copy of the five arrays, non-blocking from pinned memory on CUDA (five pageable copies each waited).
        names = [f.name for f in fields(lay)]  # Placements' fields
        sent = to_device({f: np.asarray(getattr(lay, f), dtype=np.int64) for f in names}, self.device)
        return self._compose(Placements(**sent))

    def _compose(self, where: Placements) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor version of :meth:`compose`; all tensors int64 on ``self.device``."""
        canvases = compose_canvases(self.images, where, side=self.canvas_size, scale=self.scale, fragment=self.fragment)
        return canvases, self.labels[where.index]

    def random_batch(
        self, batch: int, generator: torch.Generator, part: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch`` canvases entirely with torch on ``self.device`` (for training); return rows ``part``.

        Same distribution as :meth:`sample`, but not the same draws. The layouts of the whole global
        batch are drawn (so the generator advances identically on every DDP rank), and only the rows
        of ``part`` are composed: they equal the same rows of ``part=None``.

        Args:
            batch: global number of canvases ``B``.
            generator: a ``torch.Generator`` on ``self.device``.
            part: the rows to compose and return (``None``: all ``B``).

        Returns:
            canvases uint8 ``[b, H, W, 1]`` and labels int64 ``[b]``, ``b`` the number of rows in ``part``.
        """
        rows = _check_part(part)
        if generator.device.type != self.device.type:
            raise ValueError(f"generator is on {generator.device}, canvases are on {self.device}")
        n, N, dev = self.n_clutter, len(self), self.device

        def randint(lo: int, hi_inclusive: int, *size: int) -> torch.Tensor:
            return torch.randint(lo, hi_inclusive + 1, size, generator=generator, device=dev)

        index = randint(0, N - 1, batch)
        item_yx = randint(0, self.canvas_size - self.item_size, batch, 2)
        clutter = randint(0, max(N - 2, 0), batch, n)
        clutter += clutter >= index[:, None]  # skip the shown item
        src = randint(self._src_lo, self._src_hi, batch, n, 2)
        dst = randint(0, self.canvas_size - self.fragment, batch, n, 2)
        return self._compose(Placements(index[rows], item_yx[rows], clutter[rows], src[rows], dst[rows]))

    def sample(
        self, rngs: Sequence[np.random.Generator], indices: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """One canvas per row: :meth:`sample_layouts` (row ``i`` with ``rngs[i]``), then :meth:`compose`.

        Returns:
            canvases uint8 ``[B, H, W, 1]``, labels int64 ``[B]`` (on device), indices int64 ``[B]``.
        """
        lay = self.sample_layouts(rngs, indices)
        # In range by construction (floor(u * m) of uniforms u < 1, given indices checked): no host check at each
        # autoreset (min/max over every field: a few ms at 16k envs).
        canvases, labels = self._send_and_compose(lay)
        return canvases, labels, lay.index


def _build(
    *,
    split: str | None,
    root: str | Path | None,
    image_size: tuple[int, int],
    device: str | torch.device,
    cache_images: bool,
    clutter: int,
    scale: int | None,
    fragment: int | None,
) -> FashionMNISTCanvas:
    """The ``"fashion-mnist"`` spec's builder (see :meth:`DatasetSpec.make_source`).

    ``scale`` None: ``side // 56`` (at least 1), so the 112 px default canvas shows items x2 and smaller
    canvases still fit one; ``fragment`` None: 16 px, at most the scaled item's side.
    """
    del cache_images  # the items are in memory already
    if split is None:
        raise ValueError(f"Fashion-MNIST needs a split, one of {sorted(FASHION_MNIST_FILES)}")
    if image_size[0] != image_size[1]:
        raise ValueError(f"Fashion-MNIST canvases are square, got image_size={image_size!r}")
    scale = max(1, image_size[0] // 56) if scale is None else scale
    fragment = min(16, 28 * scale) if fragment is None else fragment
    return FashionMNISTCanvas(
        split, root, canvas_size=image_size[0], scale=scale, n_clutter=clutter, fragment=fragment, device=device
    )


register_dataset(
    DatasetSpec(
        name="fashion-mnist",
        build=_build,
        env_id="AVE-FashionMNIST-v0",
        image_size=112,
        patch=8,
        env_split="train",
        eval_split="test",
        model="vit_tiny_patch16_224",
        checkpoint="shipped:fashion-mnist",
        # A 6-block ViT-Tiny on one-channel canvases (the shipped checkpoint's architecture).
        train_model=dict(in_chans=1, depth=6, embed_dim=192, num_heads=3, mean=(0.1,), std=(0.25,)),
        lr=1e-3,
        flip=False,
        # Four clutter fragments; item scale and fragment side follow the canvas side (x2 and 16 px at 112 px).
        options=dict(clutter=4, scale=None, fragment=None),
        aliases=("fashion_mnist", "fmnist"),
        description="Fashion-MNIST items on cluttered one-channel canvases (offline: the IDX files)",
    )
)
