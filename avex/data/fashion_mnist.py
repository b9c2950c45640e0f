"""Fashion-MNIST files: where they are searched for, and reading the standard IDX ``.gz`` files.

The canvases built from the items are in :mod:`avex.data.cluttered`; installing the files from
Debian's package is :func:`avex.data.install.install_fashion_mnist`.

Shapes: ``N`` items in a split; items are uint8 ``[N, 28, 28]`` and labels int64 ``[N]``.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES", "fashion_mnist_dirs", "load_fashion_mnist"]

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
_ITEM_SIDE = 28  # pixels per side of one item


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
    """The Fashion-MNIST file names absent from ``folder``."""
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
