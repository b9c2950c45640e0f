"""Canvases from a folder of images, one sub-folder per class (``AVE-ImageFolder-v0``).

Each canvas is one whole image, resized so its shorter side covers the canvas and center cropped.
This module also registers the ``"folder"`` data set, next to the source its spec builds; given a root
that holds only split folders (``train/``, ``val/``) and no split, it reads one of them (:func:`env_split`).

Bounds and faults: an image over PIL's ``Image.MAX_IMAGE_PIXELS`` is refused before it is decoded, and
only the centred crop the canvas shows is resized, so decoding costs at most the image and the canvas
(a 1 x 20000 PNG once became a 4,480,000 x 224 intermediate); 16-bit images are scaled to 8 bits, not
clipped. Folder links back to a folder already listed (loops) are skipped with a warning, and an
unreadable folder is an error, never an empty class.

Speed: a 500x375 JPEG takes about 4 ms of one core to decode. ``avex data prepare <folder>`` writes every
canvas once into a store (:mod:`avex.data.store`), read instead with the same pixels, bad files and draws.

Shapes: ``B`` batch rows, ``N`` images, ``H, W, C`` canvas height/width/channels. Canvases are
``uint8 [B, H, W, C]`` and labels ``int64 [B]``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from avex.checks import check_folder
from avex.data.registry import DatasetSpec, canvas_hw, register_dataset
from avex.data.source import CanvasSource, _check_indices
from avex.data.store import ImageStore, find_store
from avex.transfer import send

__all__ = ["IMAGE_EXTENSIONS", "SPLIT_NAMES", "ImageFolderCanvas", "env_split"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"})
_LAYOUT_HELP = "expected layout: <root>/<class name>/<image files> ({exts})".format(
    exts=" ".join(sorted(IMAGE_EXTENSIONS))
)
_MAX_TRIES = 100  # consecutive unreadable draws per row before giving up


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, following links), in a deterministic order.

    Each folder is listed once: a link back to a folder already listed (a loop, or a second way to the same
    folder) is skipped with a warning, so two self-links cannot make the walk endless and one cannot list
    the same files again and again.

    Raises:
        ValueError: a folder cannot be read (it would otherwise look like an empty class).
    """

    def unreadable(err: OSError) -> None:
        raise ValueError(
            f"cannot read {err.filename} ({err.strerror or err}): fix its permissions or move it out of {folder}"
        ) from err

    out: list[Path] = []
    listed: set[tuple[int, int]] = set()
    loops: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in listed:
            dirnames.clear()
            loops.append(dirpath)
            continue
        listed.add((st.st_dev, st.st_ino))
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    if loops:
        warnings.warn(
            f"skipped {len(loops)} link(s) to folders already listed under {folder} (e.g. {loops[0]})",
            RuntimeWarning,
            stacklevel=3,
        )
    return out


def _to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit integer images as 8-bit grey, scaled (PIL's convert clips them: nearly white)."""
    if not img.mode.startswith("I"):
        return img
    wide = np.asarray(img).astype(np.int64)
    return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")


def _load_image(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    """Decode, resize the shorter side to cover ``size`` = (H, W), center crop -> uint8 [H, W, C].

    Raises:
        ValueError: the image has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (checked before decoding).
        Whatever PIL raises for a file it cannot decode.
    """
    H, W = size
    with Image.open(path) as img:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and img.width * img.height > limit:
            raise ValueError(
                f"{img.width}x{img.height} pixels, over PIL.Image.MAX_IMAGE_PIXELS={limit} (raise it to allow this)"
            )
        factor = max(H / img.height, W / img.width)
        # JPEG only: decode at a reduced scale that still covers the target (much faster).
        img.draft(mode, (math.ceil(img.width * factor), math.ceil(img.height * factor)))
        img = _to_8bit(img).convert(mode)
        # Resize only the centred crop the canvas shows, straight to (W, H): resizing the whole image to
        # cover the canvas first would make extreme aspect ratios huge intermediates.
        factor = max(H / img.height, W / img.width)
        crop_w, crop_h = W / factor, H / factor
        left, top = (img.width - crop_w) / 2, (img.height - crop_h) / 2
        img = img.resize((W, H), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
        arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(H, W, -1)


def _check_canvas_pixels(size: tuple[int, int]) -> None:
    """Refuse a canvas larger than PIL's decoding bound: it could only be upscaled from a smaller image, and
    resizing to it needs that many bytes per channel (100000 px a side: 30 GB per image, killed for memory)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise ValueError(
            f"image_size {size} is {size[0] * size[1]:,} pixels per canvas, over PIL.Image.MAX_IMAGE_PIXELS="
            f"{limit:,} (the largest image it decodes): pass a smaller image_size (224 is usual)"
        )


def _class_folders(folder: Path, classes: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(class sub-folders of ``folder``, sorted; the ordered class list: ``classes`` or those sub-folders).

    Raises:
        ValueError: no class folders, duplicate ``classes``, or a folder not in ``classes``.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError as err:
        raise ValueError(f"cannot read {folder} ({err.strerror or err}): fix its permissions") from err
    subdirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not subdirs:
        loose = sum(_is_image(e.name) for e in entries if e.is_file())
        hint = f" (found {loose} images directly in it: move them into one folder per class)" if loose else ""
        raise ValueError(f"no class folders in {folder}{hint}; {_LAYOUT_HELP}")
    ordered = list(subdirs if classes is None else classes)
    if len(set(ordered)) != len(ordered):
        raise ValueError("classes contains duplicate names")
    known = set(ordered)
    if unknown := [d for d in subdirs if d not in known]:
        raise ValueError(
            f"class folder(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} in {folder} "
            f"are not in the given class list ({len(ordered)} classes)"
        )
    return subdirs, ordered


class ImageFolderCanvas(CanvasSource):
    """Canvases from image files in ``root/<class>/...`` (``root/<split>/<class>/...`` with ``split``).

    Each canvas is one whole image: resized so its shorter side covers the
    canvas, then center cropped.  Labels follow the sorted class folder names,
    or the order of ``classes`` when given (folders may then be a subset).

    With a prepared store of the folder at this canvas (``avex data prepare``; :mod:`avex.data.store`), images
    are read from it instead of decoded: the same pixels, bad files and draws.

    Unreadable images do not stop an episode: each is warned about once, recorded
    in :attr:`bad_files`, counted in :attr:`skipped` (once per draw that hit an
    unreadable file), and the row draws another index with its own rng. Whether a
    file was already known to be bad does not change the draws, so the same rng
    gives the same image and the same per-row count
    (:meth:`sample_counting_skips`).

    Args:
        root: dataset folder.
        image_size: canvas ``(H, W)``, or one int for a square.
        split: optional sub-folder of ``root`` (``"train"``, ``"val"``...).
        classes: explicit ordered list of class folder names; label = position in it.
        class_names: human-readable names, one per class (default: folder names).
        in_chans: 3 (RGB) or 1 (grayscale).
        device: where canvases are returned.
        cache_images: keep decoded images in host memory (when there is no store).
        store: True: read a prepared store of the folder when one is up to date; False: decode every image;
            a store directory: read it (it must hold this folder's files).

    Raises:
        FileNotFoundError: the folder (or a given store) does not exist.
        ValueError: no class folders, no images, a class folder without images (unless ``classes`` is given),
            a folder not in ``classes``, a canvas over ``PIL.Image.MAX_IMAGE_PIXELS``, or a given store of other
            files.
    """

    decodes_on_host = True

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
        store: bool | str | os.PathLike[str] = True,
    ) -> None:
        # Decoded images kept in host memory (uint8 [H, W, C] each): JPEG decoding, not the model,
        # bounds a fast GPU env on a small folder; off by default (ImageNet-train would not fit).
        self._cache: dict[int, np.ndarray] | None = {} if cache_images else None
        folder = Path(root).expanduser()
        if split is not None:
            folder = folder / split
        check_folder("image folder", folder, _LAYOUT_HELP)
        if isinstance(in_chans, bool) or in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
        for name, names in (("classes", classes), ("class_names", class_names)):
            if names is not None and (
                isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names)
            ):
                raise ValueError(f"{name} must be a list of names (str) or None, got {type(names).__name__}")
        self.image_size = canvas_hw(image_size)
        _check_canvas_pixels(self.image_size)
        subdirs, self.classes = _class_folders(folder, classes)
        if class_names is None:
            class_names = self.classes
        if len(class_names) != len(self.classes):
            raise ValueError(f"{len(class_names)} class_names for {len(self.classes)} classes")
        label_of = {name: i for i, name in enumerate(self.classes)}
        files: list[Path] = []
        targets: list[int] = []
        empty: list[str] = []
        for d in subdirs:
            found = _list_images(folder / d)
            files += found
            targets += [label_of[d]] * len(found)
            if not found:
                empty.append(d)
        if not files:
            raise ValueError(f"no image files in the class folders of {folder}; {_LAYOUT_HELP}")
        if empty and classes is None:  # a label no episode can show (often images of another extension)
            raise ValueError(
                f"class folder(s) {empty[:5]}{' ...' if len(empty) > 5 else ''} in {folder} hold no image files: "
                f"add images, or move the folder out (or start its name with '.'); {_LAYOUT_HELP}"
            )

        self.root = folder
        self.files = files
        self.targets = np.asarray(targets, dtype=np.int64)  # [N]
        self._class_names = list(class_names)
        self.in_chans = in_chans
        self.device = torch.device(device)
        self.skipped = 0
        self.bad_files: set[Path] = set()
        self._store = find_store(folder, files, self.image_size, in_chans, store)

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

    @property
    def store(self) -> ImageStore | None:
        """The prepared store images are read from, or None (they are decoded)."""
        return self._store

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 ``[H, W, C]``; raises whatever PIL raises on a bad file (a store: OSError)."""
        if self._store is not None:
            return self._store.read(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = _load_image(self.files[index], self.image_size, "RGB" if self.in_chans == 3 else "L")
        if self._cache is not None:
            self._cache[index] = image
        return image

    def _fetch(self, index: int) -> np.ndarray | None:
        """Image ``index`` decoded, or None where a store holds it (read with the batch); raises for a bad file."""
        if self._store is None:
            return self.load(index)
        self._store.check(index)
        return None

    def _load_row(self, rng: np.random.Generator, index: int | None) -> tuple[np.ndarray | None, int, int]:
        """One readable image: (uint8 [H, W, C] or None with a store, its index, unreadable files passed over)."""
        for skipped in range(_MAX_TRIES):
            if index is None:
                index = int(rng.integers(0, len(self)))
            elif not 0 <= index < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} images")
            path = self.files[index]
            if path not in self.bad_files:
                try:
                    return self._fetch(index), index, skipped
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

    def sample_counting_skips(
        self, rngs: Sequence[np.random.Generator], indices: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """:meth:`sample`, plus int64 ``[B]``: the unreadable files each row passed over (the env's per-episode
        ``info["skipped_images"]``)."""
        rows = [self._load_row(rng, i) for rng, i in zip(rngs, _check_indices(rngs, indices))]
        used = np.array([i for _, i, _ in rows], dtype=np.int64)
        if self._store is not None:
            canvases = self._store.take(used, self.device)
        else:
            canvases = send(np.stack([img for img, _, _ in rows if img is not None]), self.device)
        labels = send(self.targets[used], self.device)
        return canvases, labels, used, np.array([n for _, _, n in rows], dtype=np.int64)

    def sample(
        self, rngs: Sequence[np.random.Generator], indices: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """One image per row (index drawn with ``rngs[i]`` unless given).

        Returns:
            canvases uint8 ``[B, H, W, C]``, labels int64 ``[B]`` (on device), indices int64 ``[B]``.
        """
        return self.sample_counting_skips(rngs, indices)[:3]


SPLIT_NAMES = ("val", "train", "test")  # folders that name a split, not a class; the env reads the first found


def env_split(root: str | Path, split: str | None) -> str | None:
    """The split the ``"folder"`` data set reads when none is given: ``split`` itself when given; else, for a
    root whose only sub-folders are split names (``train/``, ``val/``, ``test/``), ``"val"``, else ``"train"``,
    else ``"test"``, with a warning that names it; else None (the root holds the class folders).

    Picking rather than refusing: a ``train/`` + ``val/`` root is the layout torchvision and timm users
    already have (ImageNet's too, whose env reads ``val``), and read as it stands it would be a 2-class data
    set of whole splits, which is never meant. The warning says which split and that ``split=`` chooses
    (``split=""``: the root itself, for class folders that really are called so).
    """
    if split is not None:
        return split
    folder = Path(root).expanduser()
    try:
        subdirs = {e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}
    except OSError:
        return None  # ImageFolderCanvas names the problem
    if not subdirs or not subdirs <= set(SPLIT_NAMES):
        return None
    chosen = next(name for name in SPLIT_NAMES if name in subdirs)
    warnings.warn(
        f"{folder} holds split folders {sorted(subdirs)}, not class folders: reading split {chosen!r} "
        "(pass split= to read another, or split='' to read the root itself)",
        UserWarning,
        stacklevel=2,
    )
    return chosen


def _build(
    *,
    split: str | None,
    root: str | Path | None,
    image_size: tuple[int, int],
    device: str | torch.device,
    cache_images: bool,
    in_chans: int,
    classes: Sequence[str] | None,
    class_names: Sequence[str] | None,
) -> ImageFolderCanvas:
    """The ``"folder"`` spec's builder (see :meth:`DatasetSpec.make_source`)."""
    if root is None:  # make_source checks this first (needs_root); this guards a direct call
        raise ValueError(f"dataset 'folder' needs root=; {_LAYOUT_HELP}")
    return ImageFolderCanvas(
        root,
        image_size,
        split=env_split(root, split),
        classes=classes,
        class_names=class_names,
        in_chans=in_chans,
        device=device,
        cache_images=cache_images,
    )


register_dataset(
    DatasetSpec(
        name="folder",
        build=_build,
        env_id="AVE-ImageFolder-v0",
        image_size=224,
        patch=16,
        env_split=None,  # the root holds the class folders, or only split folders (see env_split)
        model="vit_small_patch16_224",
        pretrained=True,
        train_model=dict(in_chans=3),
        lr=1e-4,
        options=dict(in_chans=3, classes=None, class_names=None),
        needs_root=True,
        aliases=("imagefolder",),
        description="a folder of class sub-folders of images",
    )
)
