"""Writing a prepared image store (``avex data prepare``): every image of a folder decoded once, in parallel.

:func:`prepare_folder` lists the folder as :class:`~avex.data.folder.ImageFolderCanvas` does, decodes each file
with the source's own decoder on a pool of processes straight into the store's rows, records the files that
fail (with their error), and writes the store under a temporary name, renamed when complete, so a reader never
sees half a store. The format and where stores live: :mod:`avex.data.store`.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from tqdm.auto import tqdm

from avex.data.folder import ImageFolderCanvas, _load_image
from avex.data.store import FORMAT, IMAGES, META, STORE_DIR_ENV, VERSION, folder_fingerprint, store_dir

__all__ = ["prepare_folder", "write_store"]

_CHUNK = 64  # images per decoding task
_TARGET: list[np.memmap] = []  # the rows a decoding process writes into


def prepare_folder(
    root: str | Path,
    split: str | None = None,
    image_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    workers: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Write the store of ``root/split`` (class folders of images) at this canvas; returns its directory.

    ImageNet's source (timm's class order) reads the same store: rows follow the files, not the labels.

    Args:
        root, split, image_size, in_chans: as :class:`~avex.data.folder.ImageFolderCanvas`.
        workers: decoding processes (None: ``os.cpu_count()``).
        out: a store directory for read-only data (None: ``$AVEX_STORE_DIR`` if set, else inside the folder).
        progress: show a progress bar.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: a bad argument, a folder without class folders or images, or nowhere to write.
    """
    source = ImageFolderCanvas(root, image_size, split=split, in_chans=in_chans, store=False)
    load = functools.partial(_load_image, size=source.image_size, mode="RGB" if in_chans == 3 else "L")
    labels = (source.targets.tolist(), source.classes)
    return write_store(source.root, source.files, load, source.image_size, in_chans, labels, workers, out, progress)


def write_store(
    folder: Path,
    files: Sequence[Path],
    load: Callable[[Path], np.ndarray],
    image_size: tuple[int, int],
    channels: int,
    labels: tuple[Sequence[int], Sequence[str]],
    workers: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Decode ``files`` (under ``folder``) with ``load`` into a new store and return its directory.

    Args:
        load: picklable ``path -> uint8 [H, W, C]`` (the folder source's decoder).
        labels: (target of each file, class names), recorded in ``meta.json``.
        workers, out, progress: as :func:`prepare_folder`.

    Raises:
        ValueError: ``workers`` < 1, the store's directory cannot be written or lacks the space, or no file
            decodes (nothing is written then).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    dest = store_dir(folder, image_size, channels, out)
    shape = (len(files), *image_size, channels)
    fingerprint = folder_fingerprint(folder, files)  # before decoding: a file changed meanwhile makes it stale
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    _allocate(tmp, int(np.prod(shape)))
    try:
        bad = _decode_all(load, files, tmp / IMAGES, shape, workers, progress)
        if files and len(bad) == len(files):  # a store of nothing but blanks would fail only at an env's first sample
            index, error = bad[0]
            raise ValueError(
                f"none of the {len(files)} images under {folder} could be decoded (e.g. {files[index]}: {error}): "
                "check the files are images PIL can open; no store was written"
            )
        meta = dict(
            format=FORMAT,
            version=VERSION,
            folder=str(folder.resolve()),
            image_size=list(image_size),
            channels=channels,
            count=len(files),
            fingerprint=fingerprint,
            max_image_pixels=Image.MAX_IMAGE_PIXELS,
            pil=PIL.__version__,
            classes=list(labels[1]),
            targets=[int(t) for t in labels[0]],
            files=[p.relative_to(folder).as_posix() for p in files],
            bad=bad,
        )
        (tmp / META).write_text(json.dumps(meta))
        _replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _allocate(tmp: Path, nbytes: int) -> None:
    """A new folder ``tmp`` holding a zero-filled (sparse) rows file of ``nbytes``.

    Raises:
        ValueError: the folder cannot be written, or its disk has less than ``nbytes`` free.
    """
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(tmp).free
        if free < nbytes:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(
                f"the store needs {nbytes / 1e9:.1f} GB and {tmp.parent} has {free / 1e9:.1f} GB free: pass --out DIR "
                f"or set {STORE_DIR_ENV} to a folder with room"
            )
        with open(tmp / IMAGES, "wb") as f:
            f.truncate(nbytes)
    except OSError as err:
        raise ValueError(
            f"cannot write an image store in {tmp.parent} ({err.strerror or err}): pass --out DIR or set "
            f"{STORE_DIR_ENV} to a writable folder"
        ) from err


def _open_target(path: Path, shape: tuple[int, ...], max_pixels: int | None) -> None:
    """Decoding process set-up: the output rows, and the caller's PIL bound (a fresh interpreter has the default)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    _TARGET[:] = [np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)]


def _decode_chunk(load: Callable[[Path], np.ndarray], paths: Sequence[Path], start: int) -> list[tuple[int, str]]:
    """Decode ``paths`` into rows ``start...`` of the output; returns (index, error) of those that fail.

    No flush: the rows are in the page cache the file shares (an msync per chunk would wait for the disk)."""
    target, bad = _TARGET[0], []
    for offset, path in enumerate(paths):
        try:
            target[start + offset] = load(path)
        except Exception as err:  # PIL plugins raise many types on bad input; the folder source catches the same
            bad.append((start + offset, str(err)))
    return bad


def _decode_all(
    load: Callable[[Path], np.ndarray],
    files: Sequence[Path],
    images: Path,
    shape: tuple[int, ...],
    workers: int,
    progress: bool,
) -> list[tuple[int, str]]:
    """Decode every file into ``images`` on ``workers`` processes (1: this one); returns the failures, sorted."""
    chunks = [(list(files[a : a + _CHUNK]), a) for a in range(0, len(files), _CHUNK)]
    bad: list[tuple[int, str]] = []
    setup = (images, shape, Image.MAX_IMAGE_PIXELS)
    with tqdm(total=len(files), desc="prepare", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        if workers == 1 or len(chunks) == 1:
            _open_target(*setup)
            for paths, start in chunks:
                bad += _decode_chunk(load, paths, start)
                bar.update(len(paths))
            _TARGET.clear()
            return bad
        with ProcessPoolExecutor(workers, mp_context=_context(), initializer=_open_target, initargs=setup) as pool:
            futures = {pool.submit(_decode_chunk, load, paths, start): len(paths) for paths, start in chunks}
            for future in as_completed(futures):
                bad += future.result()
                bar.update(futures[future])
    return sorted(bad)


def _context() -> mp.context.BaseContext:
    """fork where it is safe (Linux, CUDA not started: as torch's DataLoader), so scripts need no ``__main__``
    guard and workers start at once; else forkserver (or spawn), which never forks a CUDA process."""
    if "fork" in mp.get_all_start_methods() and sys.platform == "linux" and not torch.cuda.is_initialized():
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


def _replace(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``, replacing an older store (a directory cannot be renamed over a full one)."""
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
