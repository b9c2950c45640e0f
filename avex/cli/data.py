"""``avex data``: install Fashion-MNIST (``avex data fashion-mnist``) or prepare an image folder's store
(``avex data prepare ROOT``: every image decoded once, so resets and training batches read canvases instead of
decoding JPEGs; :mod:`avex.data.store`)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from avex.checks import check_folder, check_writable
from avex.data import ImageStore, fashion_mnist_dirs, install_fashion_mnist, prepare_folder
from avex.data.folder import SPLIT_NAMES
from avex.data.registry import canvas_hw
from avex.data.store import STORE_DIR_ENV

__all__ = ["add_arguments", "main_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    # --dest/--quiet also before the data set's name, as before `avex data` had subcommands.
    p.add_argument("--dest", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="what", required=True)
    fm = sub.add_parser("fashion-mnist", help="install Fashion-MNIST from Debian's package if missing")
    fm.add_argument(
        "--dest", default=argparse.SUPPRESS, help="folder (default: $AVEX_DATA_DIR/fashion-mnist, ~/.cache/avex)"
    )
    fm.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    fm.set_defaults(handler=_fashion_mnist)

    pr = sub.add_parser(
        "prepare",
        help="decode an image folder once into a store that envs and training read instead of decoding",
        description="Decode every image of ROOT/<class>/... (or ROOT/SPLIT/<class>/...) once, as the env and training "
        "would (shorter side resized to cover the canvas, centre crop), into a memory-mapped store: "
        f"ROOT[/SPLIT]/.avex-store/<H>x<W>x<C>/, or under ${STORE_DIR_ENV} when set. Sources read it while the "
        "folder is unchanged (same pixels, same unreadable files, same seeded episodes).",
    )
    pr.add_argument("root", help="image folder (class folders, or split folders such as train/ and val/)")
    pr.add_argument(
        "--split", default=None, help="sub-folder to prepare (default: every split folder of ROOT, else ROOT itself)"
    )
    pr.add_argument(
        "--image-size", type=int, nargs="+", default=[224], metavar="PX", help="canvas side, or H W (default: 224)"
    )
    pr.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3 (RGB) or 1 (grey) (default: 3)")
    pr.add_argument(
        "--workers", type=int, default=None, help=f"decoding processes (default: os.cpu_count(), here {_cpus()})"
    )
    pr.add_argument(
        "--out", default=None, help=f"store directory for read-only data (default: ${STORE_DIR_ENV}, else inside)"
    )
    pr.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    pr.set_defaults(handler=_prepare)


def main_from_args(args: argparse.Namespace) -> int:
    return int(args.handler(args))


def _cpus() -> int:
    return os.cpu_count() or 1


def _fashion_mnist(args: argparse.Namespace) -> int:
    if args.dest is not None:  # checked before fetching: the copy into it would fail only after the download
        fix = "pass a folder for the four Fashion-MNIST files"
        check_folder("--dest", Path(args.dest).expanduser(), fix, missing_ok=True, error=ValueError)
        check_writable("--dest", Path(args.dest).expanduser(), folder=True)  # a file on the way: mkdir failed late
    try:
        path = install_fashion_mnist(args.dest, quiet=args.quiet)
    except RuntimeError as err:  # apt-get missing or failing (offline): the one-line refusal, not a traceback
        dirs = ([Path(args.dest).expanduser()] if args.dest is not None else []) + fashion_mnist_dirs()
        searched = ", ".join(str(d) for d in dict.fromkeys(dirs))
        raise FileNotFoundError(
            f"Fashion-MNIST is in none of {searched}, and fetching it failed: {' '.join(str(err).split())}"
        ) from err
    print(f"Fashion-MNIST ready in {path}")
    return 0


def _splits(root: Path, split: str | None) -> list[str | None]:
    """The splits to prepare: the given one; else every split folder when ROOT holds only those; else ROOT."""
    if split is not None:
        return [split or None]
    try:
        subdirs = {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")}
    except OSError:
        return [None]  # the folder source names the problem
    if subdirs and subdirs <= set(SPLIT_NAMES):
        return [name for name in SPLIT_NAMES if name in subdirs]
    return [None]


def _prepare(args: argparse.Namespace) -> int:
    if len(args.image_size) > 2:
        raise ValueError(f"--image-size takes one side or H W, got {len(args.image_size)} numbers")
    size = canvas_hw(args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size))
    root = Path(args.root).expanduser()
    check_folder("image folder", root, "pass a folder of class folders of images")
    if args.out is not None:
        fix = "pass a folder to hold the stores"
        check_folder("--out", Path(args.out).expanduser(), fix, missing_ok=True, error=ValueError)
    for split in _splits(root, args.split):
        start = time.perf_counter()
        path = prepare_folder(root, split, size, args.channels, args.workers, args.out, progress=not args.quiet)
        seconds = time.perf_counter() - start
        store = ImageStore.open(path)
        n, bad = len(store), len(store.bad)
        print(
            f"{root / (split or '')}: {n} images ({bad} unreadable) in {seconds:.1f} s ({n / seconds:,.0f} images/s), "
            f"{store.images.nbytes / 1e9:.2f} GB in {path}"
        )
        if bad:
            first = store.meta["files"][next(iter(store.bad))]
            print(f"  unreadable, skipped as when decoding: {json.dumps(first)} ... (meta.json lists all {bad})")
    if args.out is not None and os.environ.get(STORE_DIR_ENV) != args.out:
        print(f"set {STORE_DIR_ENV}={args.out} for avex to find it")
    return 0
