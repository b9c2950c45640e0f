"""A prepared image store: one folder split decoded once into canvases, read by memory map (``avex data prepare``).

Decoding and resizing a 500x375 JPEG takes about 4 ms of one core, so a vector env that autoresets about
85 of 1,024 episodes per step, or a training step of 1,024 images, is bound by decoding. A store holds every
image of one folder already as the canvas ``uint8 [H, W, C]`` that the folder source decodes (the same
function writes it: :func:`avex.data.folder._load_image`), in a raw file ``images.u8`` (``uint8 [N, H, W, C]``,
row ``i`` = the folder's ``i``-th file) beside ``meta.json``: the relative file list, targets, classes, canvas
size, channels, the files that could not be decoded (with their error, so sampling skips them exactly as it
does when decoding: the same warnings, counts and redraws, hence the same seeded episodes) and a fingerprint
of the folder (file names, sizes and modification times, hashed), so a changed folder is detected.

Sampling reads rows instead of decoding (:meth:`ImageStore.take`). On a CUDA device the whole store is
copied to the device once, shared by every source of the process, when it takes at most a quarter of the
free device memory (ImageNet val at 224 px: 7.5 GB); rows are then gathered on the device. Otherwise rows
are gathered from the memory map on host threads into pinned memory and copied asynchronously.
``AVEX_STORE_ON_DEVICE=0`` keeps a store on the host, ``=1`` copies it to the device whatever its size.

Where a store lives: ``<folder>/.avex-store/<H>x<W>x<C>/``, or, for read-only data, under the folder named by
``$AVEX_STORE_DIR`` (``<dir>/<hash of the folder's absolute path>/<H>x<W>x<C>/``), which is searched first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import threading
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from avex.transfer import send

__all__ = [
    "STORE_DIR_ENV",
    "ImageStore",
    "find_store",
    "folder_fingerprint",
    "prepare_command",
    "store_candidates",
    "store_dir",
]

STORE_DIR_ENV = "AVEX_STORE_DIR"
_ON_DEVICE_ENV = "AVEX_STORE_ON_DEVICE"
FORMAT, VERSION = "avex-image-store", 1
IMAGES, META = "images.u8", "meta.json"  # the two files of a store directory
_DEVICE_SHARE = 0.25  # largest part of the free device memory a store may take
_THREAD_BYTES = 8 << 20  # gathers larger than this are split over host threads
_HINT_IMAGES = 2000  # folders larger than this, without a store, get a warning that names the command
_WARNED: set[str] = set()


def folder_fingerprint(folder: Path, files: Sequence[Path]) -> str:
    """SHA-256 of the file count and each file's path relative to ``folder``, size and modification time.

    A file that cannot be stat-ed counts with size and time -1 (it may be fixed later: the store is then stale).
    """
    digest = hashlib.sha256(f"{len(files)}\n".encode())
    for path in files:
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = -1
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _store_name(image_size: tuple[int, int], channels: int) -> str:
    return f"{image_size[0]}x{image_size[1]}x{channels}"


def _keyed(base: str | Path, folder: Path) -> Path:
    """The folder's own sub-folder of a store directory: a hash of its absolute path."""
    return Path(base).expanduser() / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]


def store_dir(folder: Path, image_size: tuple[int, int], channels: int, base: str | Path | None = None) -> Path:
    """Where the store of ``folder`` at this canvas is written: under ``base`` (None: ``$AVEX_STORE_DIR``) keyed
    by the folder's absolute path, or, with neither, inside the folder."""
    base = base if base is not None else os.environ.get(STORE_DIR_ENV)
    name = _store_name(image_size, channels)
    return _keyed(base, folder) / name if base else folder / ".avex-store" / name


def store_candidates(folder: Path, image_size: tuple[int, int], channels: int) -> list[Path]:
    """Where a store of ``folder`` at this canvas may be, in search order: ``$AVEX_STORE_DIR``'s, then the folder's."""
    own = folder / ".avex-store" / _store_name(image_size, channels)
    return list(dict.fromkeys([store_dir(folder, image_size, channels), own]))


class ImageStore:
    """A prepared store opened read-only: rows of canvases by index.

    Attributes:
        path: the store directory. meta: its ``meta.json``. images: ``uint8 [N, H, W, C]`` memory map.
        bad: file index -> the error it raised when the store was written.
    """

    _open: weakref.WeakValueDictionary[tuple[str, int, int], ImageStore] = weakref.WeakValueDictionary()

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        h, w = meta["image_size"]
        self.shape = (int(meta["count"]), int(h), int(w), int(meta["channels"]))
        images = path / IMAGES
        if images.stat().st_size != int(np.prod(self.shape)):
            raise ValueError(f"{images} holds {images.stat().st_size} bytes, not {self.shape} canvases")
        self.images = np.memmap(images, dtype=np.uint8, mode="r", shape=self.shape)
        self.bad = {int(i): str(err) for i, err in meta["bad"]}
        self._lock = threading.Lock()
        self._device: dict[torch.device, torch.Tensor | None] = {}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ImageStore:
        """The store in directory ``path``, shared with every other opener in this process while it is open.

        Raises:
            FileNotFoundError: no store there.
            ValueError: not a complete store of this format.
        """
        path = Path(path).expanduser()
        meta_file = path / META
        try:
            st = os.stat(meta_file)
        except OSError as err:
            raise FileNotFoundError(f"no image store in {path} (no {META})") from err
        key = (str(path.resolve()), st.st_ino, st.st_mtime_ns)  # a rebuilt store is opened afresh
        if (found := cls._open.get(key)) is not None:
            return found
        try:
            meta = json.loads(meta_file.read_text())
            if not isinstance(meta, dict):  # valid JSON of another shape (a list) has no .get
                raise ValueError(f"{META} holds a JSON {type(meta).__name__}, not an object")
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
            store = cls(path, meta)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a usable image store ({err})") from err
        cls._open[key] = store
        return store

    def __reduce__(self) -> tuple[Any, ...]:
        return (ImageStore.open, (self.path,))  # reopen, never copy the rows

    def __len__(self) -> int:
        return self.shape[0]

    def mismatch(self, folder: Path, files: Sequence[Path], image_size: tuple[int, int], channels: int) -> str | None:
        """Why this store does not hold ``files`` of ``folder`` at this canvas (None: it does)."""
        if self.shape[1:] != (*image_size, channels):
            return f"canvases {self.shape[1:]}, not {(*image_size, channels)}"
        if self.meta.get("max_image_pixels") != Image.MAX_IMAGE_PIXELS:
            return f"written under PIL.Image.MAX_IMAGE_PIXELS={self.meta.get('max_image_pixels')}"
        if len(files) != len(self):
            return f"{len(self)} images when written, {len(files)} now"
        if folder_fingerprint(folder, files) != self.meta["fingerprint"]:
            return "files were added, removed or changed since it was written"
        return None

    def check(self, index: int) -> None:
        """Raise ``OSError`` with the recorded error where file ``index`` could not be decoded when written."""
        if index in self.bad:
            raise OSError(self.bad[index])

    def read(self, index: int) -> np.ndarray:
        """Canvas ``index``, uint8 ``[H, W, C]`` (a copy); ``OSError`` for a file that could not be decoded."""
        self.check(index)
        return np.array(self.images[index])

    def take(self, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        """Canvases ``indices`` (int [n]) as uint8 ``[n, H, W, C]`` on ``device`` (no checks: see :meth:`check`)."""
        indices = np.asarray(indices, dtype=np.int64)
        if device.type == "cuda":
            resident = self._on_device(device)
            if resident is not None:
                return resident[send(indices, device)]
            # Pinned pages from torch's caching allocator: reused only after the copy that reads them is done.
            host = torch.empty((len(indices), *self.shape[1:]), dtype=torch.uint8, pin_memory=True)
            self._gather(indices, host.numpy())
            return host.to(device, non_blocking=True)
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.uint8)
        self._gather(indices, out)
        return torch.from_numpy(out).to(device)

    def _gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Rows ``indices`` of the memory map into ``out``; large gathers on several threads (numpy drops the GIL)."""
        parts = min(_threads(), max(1, out.nbytes // _THREAD_BYTES))
        if parts == 1:
            np.take(self.images, indices, axis=0, out=out)
            return
        bounds = np.linspace(0, len(indices), parts + 1).astype(int)

        def part(k: int) -> None:
            a, b = bounds[k], bounds[k + 1]
            np.take(self.images, indices[a:b], axis=0, out=out[a:b])

        list(_pool().map(part, range(parts)))

    def _on_device(self, device: torch.device) -> torch.Tensor | None:
        """The whole store on ``device`` (copied on first use), or None where it should stay on the host."""
        if device.index is None:  # one copy for "cuda" and "cuda:<current>"
            device = torch.device("cuda", torch.cuda.current_device())
        with self._lock:  # training reads ahead on several threads
            if device not in self._device:
                self._device[device] = self._upload(device) if _fits(self.images.nbytes, device) else None
            return self._device[device]

    def _upload(self, device: torch.device) -> torch.Tensor:
        """Copy every row to ``device`` through one pinned buffer of about 64 MB: uint8 ``[N, H, W, C]``."""
        out = torch.empty(self.shape, dtype=torch.uint8, device=device)
        rows = max(1, (64 << 20) // int(np.prod(self.shape[1:])))
        buffer = torch.empty((rows, *self.shape[1:]), dtype=torch.uint8, pin_memory=True)
        for a in range(0, len(self), rows):
            b = min(len(self), a + rows)
            self._gather(np.arange(a, b), buffer.numpy()[: b - a])
            out[a:b].copy_(buffer[: b - a])  # synchronous: the buffer is refilled next
        return out


def prepare_command(folder: Path, image_size: tuple[int, int], channels: int) -> str:
    """The ``avex data prepare`` command line that writes the store of ``folder`` at this canvas."""
    size = f"{image_size[0]}" if image_size[0] == image_size[1] else f"{image_size[0]} {image_size[1]}"
    extra = "" if channels == 3 else f" --channels {channels}"
    return f"avex data prepare {shlex.quote(str(folder))} --image-size {size}{extra}"


def find_store(
    folder: Path,
    files: Sequence[Path],
    image_size: tuple[int, int],
    channels: int,
    store: bool | str | os.PathLike[str] = True,
) -> ImageStore | None:
    """The store to read ``files`` of ``folder`` from, or None to decode them.

    Args:
        store: True: the first store of :func:`store_candidates` when it holds these files; a stale one, and a
            folder of more than 2,000 images without one, are warned about once, naming the command that
            writes it. False: none. A path: that store directory, which must hold these files.

    Raises:
        ValueError: ``store`` is neither a bool nor a path, or the given store holds other files.
        FileNotFoundError: no store in the given directory.
    """
    if not isinstance(store, (bool, str, os.PathLike)):
        raise ValueError(f"store must be True, False or a store directory, got {type(store).__name__}")
    command = prepare_command(folder, image_size, channels)
    if store is False:
        return None
    if store is not True:
        opened = ImageStore.open(store)
        if (why := opened.mismatch(folder, files, image_size, channels)) is not None:
            raise ValueError(f"the image store {opened.path} does not hold {folder} ({why}); rebuild it: {command}")
        return opened
    stale: list[str] = []
    for path in store_candidates(folder, image_size, channels):
        if not (path / META).is_file():
            continue
        try:
            opened = ImageStore.open(path)
            why = opened.mismatch(folder, files, image_size, channels)
        except ValueError as err:
            why = str(err)
        if why is None:
            return opened
        stale.append(f"the image store {path} is out of date ({why})")
    if stale:
        _warn_once(f"{'; '.join(stale)}: decoding every image; rebuild it: {command}")
    elif len(files) > _HINT_IMAGES:
        _warn_once(
            f"{folder} holds {len(files)} images and no prepared store: every reset or training batch decodes its "
            f"images on the host (about 4 ms per ImageNet image); prepare them once with: {command}"
        )
    return None


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=4)


def _fits(nbytes: int, device: torch.device) -> bool:
    """Whether a store of ``nbytes`` should live on ``device`` (see the module docstring)."""
    forced = os.environ.get(_ON_DEVICE_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # free to torch, not to CUDA
    return nbytes <= _DEVICE_SHARE * (free + cached)


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(_threads(), thread_name_prefix="avex-store"))
    return _POOL[0]
