"""Canvas sources: the hidden images that an agent explores glimpse by glimpse.

Two sources share one interface, :class:`CanvasSource`:

* :class:`FashionMNISTCanvas` — the offline default.  A 28x28 Fashion-MNIST item
  is scaled x2 and dropped at a random spot of a black 112x112 canvas, together
  with a few 16x16 "clutter" fragments cut from other items.  Composition is
  batched torch indexing, so it runs on any device.
* :class:`ImageFolderCanvas` — user images in ``root/<class>/<files>``; with
  :func:`imagenet_canvas` for ImageNet-1k in timm's label order.

Fashion-MNIST itself is read from the standard IDX ``.gz`` files (see
:func:`load_fashion_mnist`, :func:`install_fashion_mnist`).

Shapes: ``B`` batch rows, ``H, W, C`` canvas height/width/channels, ``N`` items
in a split, ``n`` clutter fragments per canvas.  Canvases are always
``uint8 [B, H, W, C]`` and labels ``int64 [B]``.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "CanvasSource",
    "CanvasLayout",
    "FashionMNISTCanvas",
    "ImageFolderCanvas",
    "IMAGE_EXTENSIONS",
    "fashion_mnist_dirs",
    "load_fashion_mnist",
    "install_fashion_mnist",
    "imagenet_canvas",
]

# ---------------------------------------------------------------------------
# Fashion-MNIST files
# ---------------------------------------------------------------------------

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

#: split -> (images file, labels file), as shipped by Zalando and Debian.
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_ALL_FILES: tuple[str, ...] = tuple(f for pair in FASHION_MNIST_FILES.values() for f in pair)
_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_DEB_PACKAGE = "dataset-fashion-mnist"
_ITEM_SIDE = 28


def _data_dir() -> Path:
    """``$AVEX_DATA_DIR``, defaulting to ``~/.cache/avex``."""
    return Path(os.environ.get("AVEX_DATA_DIR") or Path.home() / ".cache" / "avex").expanduser()


def fashion_mnist_dirs() -> list[Path]:
    """Folders searched for the Fashion-MNIST files, in order.

    1. ``$AVEX_FASHION_MNIST`` (if set),
    2. ``$AVEX_DATA_DIR/fashion-mnist`` (``AVEX_DATA_DIR`` defaults to ``~/.cache/avex``),
    3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
    """
    dirs: list[Path] = []
    if env := os.environ.get("AVEX_FASHION_MNIST"):
        dirs.append(Path(env).expanduser())
    dirs.append(_data_dir() / "fashion-mnist")
    dirs.append(_SYSTEM_DIR)
    return dirs


def _missing_files(folder: Path) -> list[str]:
    return [name for name in _ALL_FILES if not (folder / name).is_file()]


def _find_fashion_mnist(root: str | Path | None) -> Path:
    """The folder holding all four files: ``root`` if given, else the first in the search order."""
    candidates = [Path(root).expanduser()] if root is not None else fashion_mnist_dirs()
    report = []
    for folder in candidates:
        missing = _missing_files(folder)
        if not missing:
            return folder
        state = "does not exist" if not folder.is_dir() else "lacks " + ", ".join(missing)
        report.append(f"  {folder} ({state})")
    raise FileNotFoundError(
        "Fashion-MNIST data not found. Searched:\n" + "\n".join(report) + "\nTo get it, do one of:\n"
        "  * run `avex data fashion-mnist` (or `make setup`), which installs it into "
        f"{_data_dir() / 'fashion-mnist'};\n"
        f"  * `sudo apt-get install {_DEB_PACKAGE}` (Debian/Ubuntu; installs into {_SYSTEM_DIR});\n"
        "  * pass root= (or set AVEX_FASHION_MNIST to) a folder holding " + ", ".join(_ALL_FILES) + "."
    )


def _corrupt(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path}: {what}. The file is corrupt or truncated; reinstall it "
        f"(delete it and run `avex data fashion-mnist`, or "
        f"`sudo apt-get install --reinstall {_DEB_PACKAGE}`)."
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes with ``ndim`` dimensions (read-only array)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # bad gzip header/CRC, truncated stream
        raise _corrupt(path, f"cannot decompress ({e})") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"only {len(raw)} bytes, shorter than the IDX header")
    # IDX magic: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != 0x0800 + ndim:
        raise _corrupt(path, f"bad IDX magic number 0x{magic:08x} (expected 0x{0x0800 + ndim:08x})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise _corrupt(path, f"header says shape {dims} ({expected} bytes) but it holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _load_pair(images_path: str, labels_path: str, _stamp: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Parse one split; cached per path (``_stamp`` = mtimes/sizes, so a reinstall is re-read)."""
    images = _read_idx(Path(images_path), ndim=3)
    labels = _read_idx(Path(labels_path), ndim=1)
    if images.shape[1:] != (_ITEM_SIDE, _ITEM_SIDE):
        raise _corrupt(Path(images_path), f"images are {images.shape[1:]}, Fashion-MNIST's are 28x28")
    if len(labels) != len(images):
        raise _corrupt(Path(labels_path), f"{len(labels)} labels for {len(images)} images in {images_path}")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise _corrupt(Path(labels_path), f"label {labels.max()} outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    labels = labels.astype(np.int64)
    labels.setflags(write=False)  # shared by every caller through the cache
    return images, labels


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one Fashion-MNIST split from the IDX ``.gz`` files.

    Args:
        split: ``"train"`` (60000 items) or ``"test"`` (10000 items).
        root: folder holding the four files; ``None`` searches :func:`fashion_mnist_dirs`.

    Returns:
        ``images`` uint8 ``[N, 28, 28]`` and ``labels`` int64 ``[N]`` in 0..9.  Both are
        read-only and cached in-process per file, so repeated calls are free.

    Raises:
        ValueError: unknown split, or a corrupt/truncated file.
        FileNotFoundError: the files are not found (the message says how to get them).
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    folder = _find_fashion_mnist(root)
    paths = [(folder / name).resolve() for name in FASHION_MNIST_FILES[split]]
    stamp = tuple(v for p in paths for v in (p.stat().st_mtime_ns, p.stat().st_size))
    return _load_pair(str(paths[0]), str(paths[1]), stamp)


def install_fashion_mnist(dest: str | Path | None = None, quiet: bool = False) -> Path:
    """Make Fashion-MNIST available, fetching Debian's package if needed.

    A no-op when the files already sit in ``dest`` or anywhere in
    :func:`fashion_mnist_dirs`: that folder is returned.  Otherwise runs
    ``apt-get download dataset-fashion-mnist`` in a temporary folder (no root
    needed, nothing is installed system-wide), unpacks the ``.deb`` with
    ``dpkg-deb -x``, copies the four ``.gz`` files into ``dest`` (default
    ``$AVEX_DATA_DIR/fashion-mnist``) and checks them by loading both splits.

    Returns:
        The folder holding the files.

    Raises:
        RuntimeError: apt-get/dpkg-deb missing or failing; the message says what to do.
    """
    dest = Path(dest).expanduser() if dest is not None else _data_dir() / "fashion-mnist"
    for folder in [dest, *fashion_mnist_dirs()]:
        if not _missing_files(folder):
            if not quiet:
                print(f"Fashion-MNIST already present in {folder}", file=sys.stderr)
            return folder

    manual = (
        f"Alternatively download {', '.join(_ALL_FILES)} "
        "(https://github.com/zalandoresearch/fashion-mnist) into a folder and set "
        "AVEX_FASHION_MNIST to it."
    )
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"Cannot fetch Fashion-MNIST: `{tool}` is not available (not Debian/Ubuntu?). {manual}")

    def run(cmd: list[str], cwd: Path) -> None:
        if not quiet:
            print("+ " + " ".join(cmd), file=sys.stderr)
        try:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"`{' '.join(cmd)}` timed out. {manual}") from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}\n"
                f"If the package is not found, run `sudo apt-get update` first and retry. {manual}"
            )

    with tempfile.TemporaryDirectory(prefix="avex-fmnist-") as tmp:
        tmp_path = Path(tmp)
        try:
            run(["apt-get", "download", _DEB_PACKAGE], tmp_path)
        except RuntimeError:
            # A fresh machine often has empty package lists: refresh them once (needs root), then retry.
            if not hasattr(os, "geteuid") or os.geteuid() != 0:
                raise
            run(["apt-get", "update", "-qq"], tmp_path)
            run(["apt-get", "download", _DEB_PACKAGE], tmp_path)
        debs = sorted(tmp_path.glob("*.deb"))
        if not debs:
            raise RuntimeError(f"`apt-get download {_DEB_PACKAGE}` produced no .deb file. {manual}")
        run(["dpkg-deb", "-x", str(debs[0]), str(tmp_path / "root")], tmp_path)
        src = tmp_path / "root" / _SYSTEM_DIR.relative_to("/")
        if missing := _missing_files(src):
            raise RuntimeError(f"{debs[0].name} does not contain {', '.join(missing)}. {manual}")
        dest.mkdir(parents=True, exist_ok=True)
        for name in _ALL_FILES:
            # Copy under a temporary name then rename, so an interrupted copy never looks complete.
            part = dest / (name + ".part")
            shutil.copyfile(src / name, part)
            os.replace(part, dest / name)

    try:
        for split in FASHION_MNIST_FILES:
            load_fashion_mnist(split, root=dest)
    except ValueError:
        for name in _ALL_FILES:
            (dest / name).unlink(missing_ok=True)
        raise
    if not quiet:
        print(f"Fashion-MNIST installed in {dest}", file=sys.stderr)
    return dest


# ---------------------------------------------------------------------------
# The common interface
# ---------------------------------------------------------------------------


@runtime_checkable
class CanvasSource(Protocol):
    """What an environment needs from a source of hidden canvases."""

    @property
    def num_classes(self) -> int: ...

    @property
    def class_names(self) -> list[str]: ...

    @property
    def canvas_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        ...

    def __len__(self) -> int: ...

    def sample(
        self, rngs: list[np.random.Generator], indices: list[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Draw one canvas per row, row ``i`` using only ``rngs[i]``.

        Args:
            rngs: one numpy Generator per row (so a row's draws do not depend on the batch).
            indices: optional item index per row; ``None`` entries (or ``indices=None``) draw one.

        Returns:
            canvases uint8 ``[B, H, W, C]`` and labels int64 ``[B]`` on the source's device,
            and the item indices used, int64 ``[B]``.
        """
        ...

    def to(self, device: str | torch.device) -> CanvasSource: ...


# ---------------------------------------------------------------------------
# Fashion-MNIST canvases
# ---------------------------------------------------------------------------


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


class FashionMNISTCanvas:
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
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        self.item_size = _ITEM_SIDE * scale
        if canvas_size < self.item_size:
            raise ValueError(f"canvas_size={canvas_size} is smaller than the scaled item ({self.item_size})")
        if n_clutter < 0:
            raise ValueError(f"n_clutter must be >= 0, got {n_clutter}")
        if not 1 <= fragment <= self.item_size:
            raise ValueError(f"fragment must be in 1..{self.item_size}, got {fragment}")
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
        indices = _check_indices(rngs, indices)
        n, N, B = self.n_clutter, len(self), len(rngs)
        u = np.stack([rng.random(3 + 5 * n) for rng in rngs]) if B else np.zeros((0, 3 + 5 * n))

        def ints(cols: np.ndarray, lo: int, hi_inclusive: int) -> np.ndarray:
            return lo + np.floor(cols * (hi_inclusive - lo + 1)).astype(np.int64)

        index = ints(u[:, 0], 0, N - 1)
        for row, i in enumerate(indices):
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

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.long).to(self.device)

        return self._compose(
            t(lay.index), t(lay.item_yx), t(lay.clutter_index), t(lay.clutter_src_yx), t(lay.clutter_dst_yx)
        )

    def _compose(
        self,
        index: torch.Tensor,
        item_yx: torch.Tensor,
        clutter_index: torch.Tensor,
        src_yx: torch.Tensor,
        dst_yx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor version of :meth:`compose`; all inputs int64 on ``self.device``."""
        B, N, S, F, s = len(index), len(self), self.item_size, self.fragment, self.scale
        side, dev = self.canvas_size, self.device
        # Work on flattened canvases/items: one gather/scatter along dim 1 per step is several
        # times faster than multi-tensor advanced indexing on CPU.
        canvas = torch.zeros(B, side * side, dtype=torch.uint8, device=dev)

        def window(yx: torch.Tensor, size: int, width: int, stride: int = 1) -> torch.Tensor:
            """Flat offsets [B, size*size] of a size x size window at yx [B, 2] in rows of `width`.

            With ``stride`` s, offsets address the unscaled pixel (r // s, c // s) instead.
            """
            r = torch.arange(size, device=dev)
            ys = (yx[:, 0:1] + r) // stride  # [B, size]
            xs = (yx[:, 1:2] + r) // stride
            return (ys[:, :, None] * width + xs[:, None, :]).reshape(B, -1)

        item = self.images[index]  # [B, 28, 28]
        if s > 1:  # nearest-neighbour upscaling
            item = item.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
        canvas.scatter_(1, window(item_yx, S, side), item.reshape(B, -1))

        flat_items = self.images.view(N, -1)  # [N, 28*28]
        for k in range(clutter_index.shape[1]):
            # Fragment pixels read straight from the 28x28 source item, scaled on the fly.
            frag = torch.gather(flat_items[clutter_index[:, k]], 1, window(src_yx[:, k], F, _ITEM_SIDE, s))
            dst = window(dst_yx[:, k], F, side)
            # gather/max/scatter rather than scatter_reduce_("amax"): plain ops work for uint8 on every backend.
            canvas.scatter_(1, dst, torch.maximum(torch.gather(canvas, 1, dst), frag))

        return canvas.view(B, side, side, 1), self.labels[index]

    def random_batch(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch`` canvases entirely with torch on ``self.device`` (for training).

        Same distribution as :meth:`sample`, but not the same draws.

        Args:
            batch: number of canvases ``B``.
            generator: a ``torch.Generator`` on ``self.device``.

        Returns:
            canvases uint8 ``[B, H, W, 1]`` and labels int64 ``[B]``.
        """
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
        return self._compose(index, item_yx, clutter, src, dst)

    def sample(
        self, rngs: list[np.random.Generator], indices: list[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """One canvas per row: :meth:`sample_layouts` (row ``i`` with ``rngs[i]``), then :meth:`compose`.

        Returns:
            canvases uint8 ``[B, H, W, 1]``, labels int64 ``[B]`` (on device), indices int64 ``[B]``.
        """
        lay = self.sample_layouts(rngs, indices)
        canvases, labels = self.compose(lay)
        return canvases, labels, lay.index


def _check_indices(rngs: Sequence[np.random.Generator], indices: Sequence[int | None] | None) -> list[int | None]:
    if indices is None:
        return [None] * len(rngs)
    if len(indices) != len(rngs):
        raise ValueError(f"got {len(indices)} indices for {len(rngs)} rngs")
    return list(indices)


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"})
_LAYOUT_HELP = "expected layout: <root>/<class name>/<image files> ({exts})".format(
    exts=" ".join(sorted(IMAGE_EXTENSIONS))
)
_MAX_TRIES = 100  # consecutive unreadable draws per row before giving up


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), in a deterministic order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return out


def _load_image(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    """Decode, resize the shorter side to cover ``size`` = (H, W), center crop -> uint8 [H, W, C]."""
    H, W = size
    with Image.open(path) as img:
        factor = max(H / img.height, W / img.width)
        # JPEG only: decode at a reduced scale that still covers the target (much faster).
        img.draft(mode, (math.ceil(img.width * factor), math.ceil(img.height * factor)))
        img = img.convert(mode)
        factor = max(H / img.height, W / img.width)
        new_w = max(W, round(img.width * factor))
        new_h = max(H, round(img.height * factor))
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - W) // 2, (new_h - H) // 2
        img = img.crop((left, top, left + W, top + H))
        arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(H, W, -1)


class ImageFolderCanvas:
    """Canvases from image files in ``root/<class>/...`` (``root/<split>/<class>/...`` with ``split``).

    Each canvas is one whole image: resized so its shorter side covers the
    canvas, then center cropped.  Labels follow the sorted class folder names,
    or the order of ``classes`` when given (folders may then be a subset).

    Unreadable images do not stop an episode: each is warned about once, recorded
    in :attr:`bad_files`, counted in :attr:`skipped` (once per draw that hit an
    unreadable file), and the row draws another index with its own rng.

    Args:
        root: dataset folder.
        image_size: canvas ``(H, W)``, or one int for a square.
        split: optional sub-folder of ``root`` (``"train"``, ``"val"``...).
        classes: explicit ordered list of class folder names; label = position in it.
        class_names: human-readable names, one per class (default: folder names).
        in_chans: 3 (RGB) or 1 (grayscale).
        device: where canvases are returned.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no class folders, no images, or a folder not in ``classes``.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | tuple[int, int] = (224, 224),
        split: str | None = None,
        classes: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        in_chans: int = 3,
        device: str | torch.device = "cpu",
        cache_images: bool = False,
    ) -> None:
        # Decoded images kept in host memory (uint8 [H, W, C] each): JPEG decoding, not the model,
        # bounds a fast GPU env on a small folder; off by default (ImageNet-train would not fit).
        self._cache: dict[int, np.ndarray] | None = {} if cache_images else None
        folder = Path(root).expanduser()
        if split is not None:
            folder = folder / split
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist; {_LAYOUT_HELP}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if H < 1 or W < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")

        subdirs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        if not subdirs:
            loose = sum(_is_image(e.name) for e in os.scandir(folder) if e.is_file())
            hint = f" (found {loose} images directly in it: move them into one folder per class)" if loose else ""
            raise ValueError(f"no class folders in {folder}{hint}; {_LAYOUT_HELP}")
        if classes is None:
            classes = subdirs
        classes = list(classes)
        label_of = {name: i for i, name in enumerate(classes)}
        if len(label_of) != len(classes):
            raise ValueError("classes contains duplicate names")
        if unknown := [d for d in subdirs if d not in label_of]:
            raise ValueError(
                f"class folder(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} in {folder} "
                f"are not in the given class list ({len(classes)} classes)"
            )
        if class_names is None:
            class_names = classes
        if len(class_names) != len(classes):
            raise ValueError(f"{len(class_names)} class_names for {len(classes)} classes")

        files: list[Path] = []
        targets: list[int] = []
        for d in subdirs:
            found = _list_images(folder / d)
            files += found
            targets += [label_of[d]] * len(found)
        if not files:
            raise ValueError(f"no image files in the class folders of {folder}; {_LAYOUT_HELP}")

        self.root = folder
        self.files = files
        self.targets = np.asarray(targets, dtype=np.int64)  # [N]
        self.classes = classes
        self._class_names = list(class_names)
        self.image_size = (H, W)
        self.in_chans = in_chans
        self.device = torch.device(device)
        self.skipped = 0
        self.bad_files: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (
            f"ImageFolderCanvas(root={str(self.root)!r}, images={len(self)}, classes={self.num_classes}, "
            f"canvas_shape={self.canvas_shape}, device={self.device})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def canvas_shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.in_chans)

    def to(self, device: str | torch.device) -> ImageFolderCanvas:
        """Return canvases on ``device`` from now on; returns self."""
        self.device = torch.device(device)
        return self

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 ``[H, W, C]``; raises whatever PIL raises on a bad file."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = _load_image(self.files[index], self.image_size, "RGB" if self.in_chans == 3 else "L")
        if self._cache is not None:
            self._cache[index] = image
        return image

    def _load_row(self, rng: np.random.Generator, index: int | None) -> tuple[np.ndarray, int]:
        for _ in range(_MAX_TRIES):
            if index is None:
                index = int(rng.integers(0, len(self)))
            elif not 0 <= index < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} images")
            path = self.files[index]
            if path not in self.bad_files:
                try:
                    return self.load(index), index
                except Exception as e:  # PIL plugins raise many types on bad input
                    self.bad_files.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {e}", RuntimeWarning, stacklevel=2)
            self.skipped += 1
            if len(self.bad_files) == len(self):
                break
            index = None  # redraw with this row's rng
        raise RuntimeError(
            f"could not read an image from {self.root}: {len(self.bad_files)} of {len(self)} files are "
            f"unreadable (e.g. {next(iter(self.bad_files))}); check the dataset"
        )

    def sample(
        self, rngs: list[np.random.Generator], indices: list[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """One image per row (index drawn with ``rngs[i]`` unless given).

        Returns:
            canvases uint8 ``[B, H, W, C]``, labels int64 ``[B]`` (on device), indices int64 ``[B]``.
        """
        rows = [self._load_row(rng, i) for rng, i in zip(rngs, _check_indices(rngs, indices))]
        used = np.array([i for _, i in rows], dtype=np.int64)
        canvases = torch.from_numpy(np.stack([img for img, _ in rows])).to(self.device)
        labels = torch.from_numpy(self.targets[used]).to(self.device)
        return canvases, labels, used


# ---------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------

_IMAGENET_LAYOUT = (
    "expected layout: <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, one folder per "
    "WordNet id (e.g. <root>/val/n01440764/ILSVRC2012_val_00000293.JPEG)"
)


@functools.lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ImageNet-1k WordNet ids and descriptions, in timm's label order."""
    from avex._compat import ensure_timm_importable

    ensure_timm_importable()
    from timm.data import ImageNetInfo  # lazy: importing timm is slow and needs the shim above

    info = ImageNetInfo("imagenet-1k")
    return tuple(info.label_names()), tuple(info.label_descriptions())


def imagenet_canvas(
    root: str | Path | None = None,
    split: str | None = "val",
    image_size: int | tuple[int, int] = 224,
    device: str | torch.device = "cpu",
    cache_images: bool = False,
) -> ImageFolderCanvas:
    """ImageNet-1k as an :class:`ImageFolderCanvas` with timm's labels (0..999).

    Args:
        root: ImageNet folder; ``None`` reads ``$AVEX_IMAGENET``.
        split: sub-folder (``"train"``/``"val"``), or ``None`` if ``root`` is the split itself.
        image_size: canvas side (or ``(H, W)``).
        device: where canvases are returned.

    The split may hold any subset of the 1000 classes; ``num_classes`` stays 1000
    and ``class_names`` are timm's descriptions (``"tench, Tinca tinca"``...).

    Raises:
        ValueError: no root given, or a folder that is not an ImageNet-1k WordNet id.
    """
    if root is None:
        root = os.environ.get("AVEX_IMAGENET") or None
    if root is None:
        raise ValueError(
            "no ImageNet folder: pass root= or set the environment variable AVEX_IMAGENET; " + _IMAGENET_LAYOUT
        )
    folder = Path(root).expanduser() / (split or "")
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet folder {folder} does not exist; {_IMAGENET_LAYOUT}")
    wnids, descriptions = _imagenet_classes()
    known = set(wnids)
    subdirs = [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    unknown = sorted(d for d in subdirs if d not in known)
    if unknown:
        raise ValueError(
            f"folder(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} in {folder} are not "
            f"ImageNet-1k WordNet ids; {_IMAGENET_LAYOUT}"
        )
    try:
        return ImageFolderCanvas(
            root,
            image_size=image_size,
            split=split,
            classes=wnids,
            class_names=descriptions,
            device=device,
            cache_images=cache_images,
        )
    except ValueError as e:
        raise ValueError(f"{e}\nFor ImageNet the {_IMAGENET_LAYOUT}") from e
