"""Installing Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, without root.

``apt-get download`` fetches the ``.deb`` into a temporary folder, ``dpkg-deb -x`` unpacks it there,
and the four IDX files are copied into the user's data folder: nothing is installed system-wide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from avex.data.fashion_mnist import (
    _ALL_FILES,
    _DEB_PACKAGE,
    _SYSTEM_DIR,
    FASHION_MNIST_FILES,
    _data_dir,
    _missing_files,
    fashion_mnist_dirs,
    load_fashion_mnist,
)

__all__ = ["install_fashion_mnist"]

_MANUAL = (
    f"Alternatively download {', '.join(_ALL_FILES)} "
    "(https://github.com/zalandoresearch/fashion-mnist) into a folder and set "
    "AVEX_FASHION_MNIST to it."
)
# Where the package puts the files, relative to the unpacked .deb's root (bound at import: it is the
# package's layout, not a search location).
_DEB_DATA_DIR = _SYSTEM_DIR.relative_to("/")


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

    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"Cannot fetch Fashion-MNIST: `{tool}` is not available (not Debian/Ubuntu?). {_MANUAL}")

    with tempfile.TemporaryDirectory(prefix="avex-fmnist-") as tmp:
        src = _unpack_deb(Path(tmp), quiet)
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


def _unpack_deb(tmp: Path, quiet: bool) -> Path:
    """Download and unpack the package inside ``tmp``; returns the unpacked folder holding the four files."""
    try:
        _run(["apt-get", "download", _DEB_PACKAGE], tmp, quiet)
    except RuntimeError:
        # A fresh machine often has empty package lists: refresh them once (needs root), then retry.
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-qq"], tmp, quiet)
        _run(["apt-get", "download", _DEB_PACKAGE], tmp, quiet)
    debs = sorted(tmp.glob("*.deb"))
    if not debs:
        raise RuntimeError(f"`apt-get download {_DEB_PACKAGE}` produced no .deb file. {_MANUAL}")
    _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], tmp, quiet)
    src = tmp / "root" / _DEB_DATA_DIR
    if missing := _missing_files(src):
        raise RuntimeError(f"{debs[0].name} does not contain {', '.join(missing)}. {_MANUAL}")
    return src


def _run(cmd: list[str], cwd: Path, quiet: bool) -> None:
    """Run ``cmd`` in ``cwd``; a failure or time-out raises RuntimeError with its output's tail."""
    if not quiet:
        print("+ " + " ".join(cmd), file=sys.stderr)
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"`{' '.join(cmd)}` timed out. {_MANUAL}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}\n"
            f"If the package is not found, run `sudo apt-get update` first and retry. {_MANUAL}"
        )
