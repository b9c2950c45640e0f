"""ImageNet-1k from a local folder, in timm's label order (``AVE-ImageNet-v0``).

ImageNet is an :class:`~avex.data.folder.ImageFolderCanvas` whose classes are the 1000 WordNet ids
in timm's order (labels 0..999) and whose class names are timm's descriptions. timm is imported
lazily, on the first ImageNet source. This module also registers the ``"imagenet"`` data set.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from avex.checks import check_folder
from avex.data.folder import ImageFolderCanvas
from avex.data.registry import DatasetSpec, register_dataset

__all__ = ["imagenet_canvas", "imagenet_classes"]

_IMAGENET_LAYOUT = (
    "expected layout: <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, one folder per "
    "WordNet id (e.g. <root>/val/n01440764/ILSVRC2012_val_00000293.JPEG)"
)


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
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
    store: bool | str | os.PathLike[str] = True,
) -> ImageFolderCanvas:
    """ImageNet-1k as an :class:`ImageFolderCanvas` with timm's labels (0..999).

    Args:
        root: ImageNet folder; ``None`` reads ``$AVEX_IMAGENET``.
        split: sub-folder (``"train"``/``"val"``), or ``None`` if ``root`` is the split itself.
        image_size: canvas side (or ``(H, W)``).
        device: where canvases are returned.
        cache_images: keep decoded images in host memory (when there is no store).
        store: read the split's prepared store (``avex data prepare <root> --split val``) when it is up to
            date (True), never (False), or a given store directory. Rows follow the files, not the labels, so
            one store serves this class order and the folder's own.

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
    # the root first: a file there would else be named as the missing "<file>/val"
    check_folder("ImageNet root", Path(root).expanduser(), _IMAGENET_LAYOUT)
    check_folder("ImageNet folder", folder, _IMAGENET_LAYOUT)
    wnids, descriptions = imagenet_classes()
    known = set(wnids)
    try:
        subdirs = [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    except OSError as err:
        raise ValueError(f"cannot read {folder} ({err.strerror or err}): fix its permissions") from err
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
            store=store,
        )
    except ValueError as e:
        raise ValueError(f"{e}\nFor ImageNet the {_IMAGENET_LAYOUT}") from e


def _build(
    *,
    split: str | None,
    root: str | Path | None,
    image_size: tuple[int, int],
    device: str | torch.device,
    cache_images: bool,
) -> ImageFolderCanvas:
    """The ``"imagenet"`` spec's builder (see :meth:`DatasetSpec.make_source`)."""
    return imagenet_canvas(root, split, image_size, device=device, cache_images=cache_images)


register_dataset(
    DatasetSpec(
        name="imagenet",
        build=_build,
        env_id="AVE-ImageNet-v0",
        image_size=224,
        patch=16,
        env_split="val",
        # DeiT-III-S as in TORE's ImageNet runs: hub weights for the env, fine-tuned in training.
        model="deit3_small_patch16_224",
        pretrained=True,
        train_model=dict(in_chans=3),
        lr=1e-4,
        description="ImageNet-1k from a local folder (root= or $AVEX_IMAGENET), timm's label order",
    )
)
