"""Tests for the data-set registry (avex.data.registry): the built-ins, their defaults, names, options.

No network and no real data: the Fashion-MNIST files are conftest's fakes, image folders are written into tmp_path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avex.data import (
    DATASETS,
    DatasetSpec,
    FashionMNISTCanvas,
    ImageFolderCanvas,
    get_dataset,
    register_dataset,
)

# The defaults the envs and training used before the registry held them (the env ids' kwargs, the env's
# default split and size, training's per-data-set model), pinned so a changed default in the registry fails here.
ENV_DEFAULTS = {
    "fashion-mnist": dict(
        env_id="AVE-FashionMNIST-v0",
        env_split="train",
        image_size=112,
        patch=8,
        glimpse=2,
        budget=12,
        checkpoint="shipped:fashion-mnist",
        pretrained=False,
        options=dict(clutter=4, scale=None, fragment=None),
        needs_root=False,
    ),
    "imagenet": dict(
        env_id="AVE-ImageNet-v0",
        env_split="val",
        image_size=224,
        patch=16,
        glimpse=2,
        budget=12,
        model="deit3_small_patch16_224",
        checkpoint=None,
        pretrained=True,
        options={},
        needs_root=False,
    ),
    "folder": dict(
        env_id="AVE-ImageFolder-v0",
        env_split=None,
        image_size=224,
        patch=16,
        glimpse=2,
        budget=12,
        model="vit_small_patch16_224",
        checkpoint=None,
        pretrained=True,
        options=dict(in_chans=3, classes=None, class_names=None),
        needs_root=True,
    ),
}
TRAIN_DEFAULTS = {
    "fashion-mnist": dict(
        model="vit_tiny_patch16_224",
        img_size=112,
        patch=8,
        in_chans=1,
        depth=6,
        embed_dim=192,
        num_heads=3,
        mean=(0.1,),
        std=(0.25,),
        lr=1e-3,
    ),
    "imagenet": dict(model="deit3_small_patch16_224", img_size=224, patch=16, in_chans=3, lr=1e-4),
    "folder": dict(model="vit_small_patch16_224", img_size=224, patch=16, in_chans=3, lr=1e-4),
}
SPLITS = {"fashion-mnist": ("train", "test"), "imagenet": ("train", "val"), "folder": ("train", "val")}
FLIPS = {"fashion-mnist": False, "imagenet": True, "folder": True}


def _png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    _png(tmp_path / "images" / "cat" / "a.png", (255, 0, 0))
    _png(tmp_path / "images" / "dog" / "b.png", (0, 0, 255))
    return tmp_path / "images"


def test_registry_lists_the_builtins_first_default():
    assert {"fashion-mnist", "folder", "imagenet"} <= set(DATASETS.names())  # tests may register more
    assert DATASETS.names()[0] == "fashion-mnist"  # the offline default
    assert len(DATASETS) >= 3 and list(DATASETS) == DATASETS.names()


@pytest.mark.parametrize("name", sorted(ENV_DEFAULTS))
def test_builtin_defaults(name):
    spec = get_dataset(name)
    assert isinstance(spec, DatasetSpec) and spec.name == name and spec.description
    for field, value in ENV_DEFAULTS[name].items():
        assert getattr(spec, field) == value, field
    # Training's defaults, plus the env's glimpse and budget (training used 2 and 12 for every data set).
    assert spec.train_defaults() == dict(TRAIN_DEFAULTS[name], glimpse=2, budget=12)
    assert (spec.train_split, spec.eval_split) == SPLITS[name]
    assert spec.flip is FLIPS[name]


@pytest.mark.parametrize(
    "alias, name",
    [
        ("fashion_mnist", "fashion-mnist"),
        ("fmnist", "fashion-mnist"),
        ("imagefolder", "folder"),
        ("imagenet", "imagenet"),
    ],
)
def test_aliases_resolve(alias, name):
    assert get_dataset(alias) is get_dataset(name)
    assert DATASETS.canonical(alias) == name and alias in DATASETS


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown data set 'mnist'") as info:
        get_dataset("mnist")
    for name in ("fashion-mnist", "imagenet", "folder"):
        assert name in str(info.value)


def test_names_cannot_be_taken_twice():
    spec = get_dataset("folder")
    assert register_dataset(spec) is spec  # re-registering the same spec is a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(dataclasses.replace(spec, description="another folder"))
    with pytest.raises(ValueError, match="'fmnist' is already registered"):
        register_dataset(dataclasses.replace(spec, name="mine", aliases=("fmnist",)))
    assert "mine" not in DATASETS


def test_bad_default_image_size_fails_at_construction():
    with pytest.raises(ValueError, match="image_size"):
        DatasetSpec(name="bad", build=FashionMNISTCanvas, image_size=0)


# -- make_source ------------------------------------------------------------------------


def test_fashion_mnist_source_defaults_and_clutter(fake_fmnist_root):
    spec = get_dataset("fmnist")
    src = spec.make_source(root=fake_fmnist_root)
    assert isinstance(src, FashionMNISTCanvas)
    assert (src.split, src.canvas_shape, src.n_clutter, src.scale, src.fragment) == ("train", (112, 112, 1), 4, 2, 16)
    assert len(spec.make_source(split="test", root=fake_fmnist_root)) == 20
    clean = spec.make_source(root=fake_fmnist_root, image_size=96, clutter=0)
    assert isinstance(clean, FashionMNISTCanvas) and clean.n_clutter == 0 and clean.canvas_shape == (96, 96, 1)
    assert spec.make_source(root=fake_fmnist_root, clutter=None).n_clutter == 4  # None: the default


def test_fashion_mnist_source_equals_the_env_construction(fake_fmnist_root):
    """make_source draws exactly the canvases envs/core.py build_source made (same seeds, same canvases)."""
    src = get_dataset("fashion-mnist").make_source(root=fake_fmnist_root, clutter=3)
    ref = FashionMNISTCanvas("train", fake_fmnist_root, canvas_size=112, n_clutter=3)
    canvases, labels, indices = src.sample([np.random.default_rng(i) for i in range(6)])
    want_canvases, want_labels, want_indices = ref.sample([np.random.default_rng(i) for i in range(6)])
    assert torch.equal(canvases, want_canvases) and torch.equal(labels, want_labels)
    np.testing.assert_array_equal(indices, want_indices)


def test_fashion_mnist_refuses_non_square(fake_fmnist_root):
    with pytest.raises(ValueError, match="square"):
        get_dataset("fashion-mnist").make_source(root=fake_fmnist_root, image_size=(112, 128))


@pytest.mark.parametrize(
    "name, option",
    [("imagenet", "clutter"), ("folder", "clutter"), ("fashion-mnist", "in_chans"), ("imagenet", "classes")],
)
def test_option_of_another_data_set_is_rejected(name, option, tmp_path):
    # Rejected before any file is read: the root does not even exist.
    with pytest.raises(ValueError, match=f"'{option}'.*do not apply to data set '{name}'"):
        get_dataset(name).make_source(root=tmp_path / "nowhere", **{option: 1})


def test_folder_source_needs_root_and_passes_options(image_root):
    spec = get_dataset("imagefolder")
    with pytest.raises(ValueError, match="needs root="):
        spec.make_source()
    src = spec.make_source(root=image_root, image_size=(8, 6), in_chans=1, clutter=None)
    assert isinstance(src, ImageFolderCanvas)
    assert src.canvas_shape == (8, 6, 1) and src.class_names == ["cat", "dog"]
    ordered = spec.make_source(root=image_root, image_size=8, classes=["dog", "cat"], class_names=["D", "C"])
    assert ordered.class_names == ["D", "C"]
    assert spec.make_source(root=image_root).canvas_shape == (224, 224, 3)


def test_imagenet_source_reads_the_val_split(tmp_path):
    _png(tmp_path / "val" / "n01440764" / "t.JPEG", (255, 0, 0))
    src = get_dataset("imagenet").make_source(root=tmp_path, image_size=8)
    assert isinstance(src, ImageFolderCanvas) and src.root == tmp_path / "val"
    assert src.num_classes == 1000 and src.canvas_shape == (8, 8, 3)
