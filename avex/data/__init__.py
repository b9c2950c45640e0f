"""Canvas sources (the hidden images an agent explores glimpse by glimpse) and the data-set registry.

One idea per module:

* :mod:`~avex.data.source` — :class:`CanvasSource`, the interface every source implements.
* :mod:`~avex.data.registry` — :class:`DatasetSpec` and :data:`DATASETS`: each data set's builder and defaults.
* :mod:`~avex.data.fashion_mnist` — the Fashion-MNIST IDX files: search order, reading, checks.
* :mod:`~avex.data.install` — :func:`install_fashion_mnist` from Debian's package.
* :mod:`~avex.data.cluttered` — :class:`FashionMNISTCanvas`: items on cluttered canvases (``"fashion-mnist"``).
* :mod:`~avex.data.compose` — :func:`compose_canvases`: a batch of cluttered canvases from their layouts (Triton).
* :mod:`~avex.data.folder` — :class:`ImageFolderCanvas`: ``root/<class>/<images>`` (``"folder"``).
* :mod:`~avex.data.imagenet` — :func:`imagenet_canvas`: ImageNet-1k in timm's label order (``"imagenet"``).
* :mod:`~avex.data.store` — :class:`ImageStore`: a folder's canvases decoded once, read by memory map.
* :mod:`~avex.data.prepare` — :func:`prepare_folder`: writes a store (``avex data prepare``).

Importing this package registers the three built-in data sets. Canvases are always
``uint8 [B, H, W, C]`` and labels ``int64 [B]``.
"""

from avex.data.cluttered import CanvasLayout, FashionMNISTCanvas
from avex.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, fashion_mnist_dirs, load_fashion_mnist
from avex.data.folder import IMAGE_EXTENSIONS, ImageFolderCanvas
from avex.data.imagenet import imagenet_canvas
from avex.data.install import install_fashion_mnist
from avex.data.prepare import prepare_folder
from avex.data.registry import DATASETS, DatasetSpec, get_dataset, register_dataset
from avex.data.source import CanvasSource
from avex.data.store import ImageStore

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "IMAGE_EXTENSIONS",
    "CanvasLayout",
    "CanvasSource",
    "DatasetSpec",
    "FashionMNISTCanvas",
    "ImageFolderCanvas",
    "ImageStore",
    "fashion_mnist_dirs",
    "get_dataset",
    "imagenet_canvas",
    "install_fashion_mnist",
    "load_fashion_mnist",
    "prepare_folder",
    "register_dataset",
]
