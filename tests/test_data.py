"""Tests for avex.data: Fashion-MNIST IDX loading, canvas composition, image folders, random batches.

No network and no real data: tiny IDX files and images are written into tmp_path.
"""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avex import data
from avex.data import (
    CanvasLayout,
    CanvasSource,
    FashionMNISTCanvas,
    ImageFolderCanvas,
    imagenet_canvas,
    install_fashion_mnist,
    load_fashion_mnist,
)
from avex.data import fashion_mnist as fmnist_files
from avex.data import install as installer

N_ITEMS = 6


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros: every pixel is ink
    labels = np.arange(n) % 10
    return images, labels


@pytest.fixture
def fmnist(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A folder with the four Fashion-MNIST files holding tiny fake splits."""
    root = tmp_path / "fmnist"
    root.mkdir()
    splits = {"train": _fake_items(N_ITEMS, 0), "test": _fake_items(3, 1)}
    for split, (img_name, lab_name) in data.FASHION_MNIST_FILES.items():
        images, labels = splits[split]
        _write_idx(root / img_name, images)
        _write_idx(root / lab_name, labels)
    return root, splits


@pytest.fixture
def no_data_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every search location at empty temp folders."""
    monkeypatch.delenv("AVEX_FASHION_MNIST", raising=False)
    monkeypatch.setenv("AVEX_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fmnist_files, "_SYSTEM_DIR", tmp_path / "system")


# -- Fashion-MNIST files -------------------------------------------------------


def test_load_shapes_values_and_cache(fmnist):
    root, splits = fmnist
    images, labels = load_fashion_mnist("train", root=root)
    assert images.dtype == np.uint8 and images.shape == (N_ITEMS, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (N_ITEMS,)
    np.testing.assert_array_equal(images, splits["train"][0])
    np.testing.assert_array_equal(labels, splits["train"][1])
    test_images, _ = load_fashion_mnist("test", root=root)
    assert test_images.shape == (3, 28, 28)
    again, _ = load_fashion_mnist("train", root=str(root))
    assert again is images  # cached, not re-read
    assert not images.flags.writeable


def test_bad_split(fmnist):
    with pytest.raises(ValueError, match="'test'.*'train'|'train'.*'test'"):
        load_fashion_mnist("validation", root=fmnist[0])


def test_missing_root_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train", root=missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert "avex data fashion-mnist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "root=" in msg


def test_partial_folder_names_missing_files(fmnist):
    root, _ = fmnist
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist("train", root=root)


def test_search_order(fmnist, no_data_anywhere, tmp_path, monkeypatch):
    root, splits = fmnist
    dirs = data.fashion_mnist_dirs()
    assert dirs == [tmp_path / "cache" / "fashion-mnist", tmp_path / "system"]
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("test")
    assert str(tmp_path / "cache" / "fashion-mnist") in str(info.value)
    assert str(tmp_path / "system") in str(info.value)

    monkeypatch.setenv("AVEX_FASHION_MNIST", str(root))
    assert data.fashion_mnist_dirs()[0] == root
    np.testing.assert_array_equal(load_fashion_mnist("test")[0], splits["test"][0])


@pytest.mark.parametrize("damage", ["magic", "truncated", "not_gzip", "label_count"])
def test_corrupt_idx(fmnist, damage):
    root, splits = fmnist
    images, labels = splits["train"]
    img_path = root / "train-images-idx3-ubyte.gz"
    if damage == "magic":
        with gzip.open(img_path, "wb") as f:
            f.write(struct.pack(">IIII", 0x0801, N_ITEMS, 28, 28) + images.tobytes())
        bad = img_path
    elif damage == "truncated":
        with gzip.open(img_path, "wb") as f:
            f.write(struct.pack(">IIII", 0x0803, N_ITEMS, 28, 28) + images.tobytes()[:-100])
        bad = img_path
    elif damage == "not_gzip":
        img_path.write_bytes(b"this is not gzip data at all")
        bad = img_path
    else:
        bad = root / "train-labels-idx1-ubyte.gz"
        _write_idx(bad, labels[:-1])
    with pytest.raises(ValueError, match="reinstall") as info:
        load_fashion_mnist("train", root=root)
    assert bad.name in str(info.value)


def test_install_is_noop_when_present(fmnist, no_data_anywhere, monkeypatch):
    root, _ = fmnist
    monkeypatch.setenv("AVEX_FASHION_MNIST", str(root))

    def no_subprocess(*args, **kwargs):
        raise AssertionError("must not call apt-get when the data is present")

    monkeypatch.setattr(installer.subprocess, "run", no_subprocess)
    assert install_fashion_mnist(quiet=True) == root


def test_install_without_apt_get(no_data_anywhere, monkeypatch, tmp_path):
    monkeypatch.setattr(installer.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get") as info:
        install_fashion_mnist(tmp_path / "dest", quiet=True)
    assert "AVEX_FASHION_MNIST" in str(info.value)
    assert not (tmp_path / "dest").exists()


def test_install_apt_failure_says_update(no_data_anywhere, monkeypatch, tmp_path):
    class Failed:
        returncode = 100
        stdout = ""
        stderr = "E: Unable to locate package dataset-fashion-mnist"

    monkeypatch.setattr(installer.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(installer.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match="apt-get update") as info:
        install_fashion_mnist(tmp_path / "dest", quiet=True)
    assert "Unable to locate package" in str(info.value)


@pytest.mark.parametrize("root_user", [True, False])
def test_install_refreshes_empty_package_lists_once_as_root(no_data_anywhere, monkeypatch, tmp_path, root_user):
    """A fresh machine's first `apt-get download` fails on empty lists: as root, update once and retry."""
    calls: list[list[str]] = []

    class Result:
        def __init__(self, code: int) -> None:
            self.returncode, self.stdout, self.stderr = code, "", "" if code == 0 else "E: Unable to locate package"

    def fake_run(cmd, **kwargs):
        calls.append(cmd[:2])
        return Result(100 if cmd[:2] == ["apt-get", "download"] and ["apt-get", "update"] not in calls else 0)

    monkeypatch.setattr(installer.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(installer.subprocess, "run", fake_run)
    monkeypatch.setattr(installer.os, "geteuid", lambda: 0 if root_user else 1000)
    with pytest.raises(RuntimeError):  # the fake download writes no .deb, or (non-root) the first failure stands
        install_fashion_mnist(tmp_path / "dest", quiet=True)
    want = (
        [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
        if root_user
        else [["apt-get", "download"]]
    )
    assert calls == want


# -- Fashion-MNIST canvases ----------------------------------------------------


def _reference_canvas(images: np.ndarray, lay: CanvasLayout, row: int, size: int = 112, s: int = 2, f: int = 16):
    """Plain-numpy rendering of one layout row, for comparison."""
    canvas = np.zeros((size, size), np.uint8)
    big = np.repeat(np.repeat(images, s, axis=1), s, axis=2)
    S = big.shape[1]
    y, x = lay.item_yx[row]
    canvas[y : y + S, x : x + S] = big[lay.index[row]]
    for k in range(lay.clutter_index.shape[1]):
        sy, sx = lay.clutter_src_yx[row, k]
        dy, dx = lay.clutter_dst_yx[row, k]
        frag = big[lay.clutter_index[row, k], sy : sy + f, sx : sx + f]
        canvas[dy : dy + f, dx : dx + f] = np.maximum(canvas[dy : dy + f, dx : dx + f], frag)
    return canvas


def test_canvas_properties_and_protocol(fmnist):
    src = FashionMNISTCanvas(root=fmnist[0])
    assert isinstance(src, CanvasSource)
    assert len(src) == N_ITEMS
    assert src.num_classes == 10 and src.class_names[0] == "T-shirt/top" and len(src.class_names) == 10
    assert src.canvas_shape == (112, 112, 1)
    assert src.images.dtype == torch.uint8 and src.images.shape == (N_ITEMS, 28, 28)


def test_same_seed_same_layout_and_canvas(fmnist):
    src = FashionMNISTCanvas(root=fmnist[0])
    a = src.sample_layout(np.random.default_rng(7))
    b = src.sample_layout(np.random.default_rng(7))
    c = src.sample_layout(np.random.default_rng(8))
    for name in ("index", "item_yx", "clutter_index", "clutter_src_yx", "clutter_dst_yx"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.clutter_index.shape == (1, 4) and a.clutter_dst_yx.shape == (1, 4, 2)
    assert not np.array_equal(a.item_yx, c.item_yx) or not np.array_equal(a.clutter_dst_yx, c.clutter_dst_yx)
    ca, la = src.compose(a)
    cb, lb = src.compose(b)
    assert torch.equal(ca, cb) and torch.equal(la, lb)


def test_item_placed_exactly_without_clutter(fmnist):
    root, splits = fmnist
    images = splits["train"][0]
    src = FashionMNISTCanvas(root=root, n_clutter=0)
    lay = src.sample_layout(np.random.default_rng(3))
    canvas, label = src.compose(lay)
    assert canvas.shape == (1, 112, 112, 1) and canvas.dtype == torch.uint8
    assert label.dtype == torch.int64 and label.item() == splits["train"][1][lay.index[0]]
    got = canvas[0, :, :, 0].numpy()
    y, x = lay.item_yx[0]
    expected = np.repeat(np.repeat(images[lay.index[0]], 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(got[y : y + 56, x : x + 56], expected)
    got[y : y + 56, x : x + 56] = 0
    assert got.max() == 0  # background stays black


def test_clutter_matches_reference_and_avoids_item(fmnist):
    root, splits = fmnist
    src = FashionMNISTCanvas(root=root)
    rngs = [np.random.default_rng(i) for i in range(20)]
    lay = CanvasLayout.stack([src.sample_layout(r) for r in rngs])
    assert (lay.clutter_index != lay.index[:, None]).all()
    assert lay.clutter_src_yx.min() >= 8 and lay.clutter_src_yx.max() <= 56 - 8 - 16  # central 40x40
    assert lay.clutter_dst_yx.min() >= 0 and lay.clutter_dst_yx.max() <= 112 - 16
    canvases, _ = src.compose(lay)
    for row in range(len(lay)):
        np.testing.assert_array_equal(canvases[row, :, :, 0].numpy(), _reference_canvas(splits["train"][0], lay, row))


def test_batched_layouts_equal_rows_and_cover_every_value(fmnist):
    src = FashionMNISTCanvas(root=fmnist[0])
    batched = src.sample_layouts([np.random.default_rng(i) for i in range(3000)])
    row = src.sample_layouts([np.random.default_rng(17)])
    for name in ("index", "item_yx", "clutter_index", "clutter_src_yx", "clutter_dst_yx"):
        np.testing.assert_array_equal(getattr(batched, name)[17:18], getattr(row, name))
    # floor(u * m) must reach both ends of every range, and nothing beyond them.
    assert set(np.unique(batched.item_yx)) == set(range(112 - 56 + 1))
    assert set(np.unique(batched.clutter_dst_yx)) == set(range(112 - 16 + 1))
    assert set(np.unique(batched.clutter_src_yx)) == set(range(8, 56 - 8 - 16 + 1))
    assert set(np.unique(batched.index)) == set(range(N_ITEMS))
    assert (batched.clutter_index != batched.index[:, None]).all() and batched.clutter_index.max() == N_ITEMS - 1


def test_fixed_index_keeps_positions(fmnist):
    src = FashionMNISTCanvas(root=fmnist[0])
    free = src.sample_layout(np.random.default_rng(5))
    fixed_index = (int(free.index[0]) + 1) % N_ITEMS
    fixed = src.sample_layout(np.random.default_rng(5), index=fixed_index)
    assert fixed.index[0] == fixed_index
    np.testing.assert_array_equal(fixed.item_yx, free.item_yx)
    np.testing.assert_array_equal(fixed.clutter_dst_yx, free.clutter_dst_yx)
    with pytest.raises(IndexError):
        src.sample_layout(np.random.default_rng(5), index=N_ITEMS)


def test_compose_batched_equals_rows(fmnist):
    src = FashionMNISTCanvas(root=fmnist[0])
    layouts = [src.sample_layout(np.random.default_rng(i)) for i in range(5)]
    batched, labels = src.compose(layouts)
    assert batched.shape == (5, 112, 112, 1)
    for i, lay in enumerate(layouts):
        one, one_label = src.compose(lay)
        assert torch.equal(batched[i], one[0]) and labels[i] == one_label[0]
    stacked = CanvasLayout.stack(layouts)
    assert torch.equal(src.compose(stacked.row(2))[0][0], batched[2])


def test_compose_rejects_out_of_range(fmnist):
    src = FashionMNISTCanvas(root=fmnist[0])
    lay = src.sample_layout(np.random.default_rng(0))
    lay.item_yx[0, 0] = 112 - 56 + 1
    with pytest.raises(ValueError, match="item_yx"):
        src.compose(lay)


def test_sample_protocol(fmnist):
    root, splits = fmnist
    src = FashionMNISTCanvas(root=root)
    canvases, labels, indices = src.sample([np.random.default_rng(i) for i in range(4)], [None, 2, None, 0])
    assert canvases.shape == (4, 112, 112, 1) and canvases.dtype == torch.uint8
    assert labels.dtype == torch.int64 and indices.dtype == np.int64
    assert indices[1] == 2 and indices[3] == 0
    np.testing.assert_array_equal(labels.numpy(), splits["train"][1][indices])
    # A single-row call with the same seed reproduces row 0 (single env == vector env).
    single, _, single_idx = src.sample([np.random.default_rng(0)])
    assert single_idx[0] == indices[0] and torch.equal(single[0], canvases[0])


def test_random_batch(fmnist):
    root, splits = fmnist
    src = FashionMNISTCanvas(root=root, n_clutter=0)
    canvases, labels = src.random_batch(64, torch.Generator().manual_seed(0))
    assert canvases.shape == (64, 112, 112, 1) and canvases.dtype == torch.uint8
    assert labels.shape == (64,) and labels.dtype == torch.int64
    assert set(labels.tolist()) <= set(splits["train"][1].tolist())
    # Without clutter the ink is exactly one 56x56 block (fake items have no zero pixels).
    ink = canvases[..., 0] > 0
    assert (ink.sum(dim=(1, 2)) == 56 * 56).all()
    rows = ink.any(dim=2).float().argmax(dim=1)
    cols = ink.any(dim=1).float().argmax(dim=1)
    assert rows.max() <= 56 and cols.max() <= 56
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 32  # positions vary
    again, _ = src.random_batch(64, torch.Generator().manual_seed(0))
    assert torch.equal(again, canvases)


def test_random_batch_clutter_adds_ink(fmnist):
    src = FashionMNISTCanvas(root=fmnist[0], n_clutter=4)
    canvases, _ = src.random_batch(32, torch.Generator().manual_seed(1))
    ink = (canvases[..., 0] > 0).sum(dim=(1, 2))
    assert (ink >= 56 * 56).all() and (ink > 56 * 56).any()
    assert (ink <= 56 * 56 + 4 * 16 * 16).all()


def test_random_batch_draws_are_pinned(fmnist):
    """The full draw is today's, bit for bit (values recorded from the pre-package avex/data.py)."""
    src = FashionMNISTCanvas(root=fmnist[0])
    canvases, labels = src.random_batch(12, torch.Generator().manual_seed(0))
    assert labels.tolist() == [2, 3, 5, 0, 1, 3, 1, 1, 1, 3, 5, 2]
    assert canvases.long().sum(dim=(1, 2, 3)).tolist() == [
        505081, 498386, 454719, 481311, 473116, 510186, 481241, 511492, 530113, 477287, 521907, 531446
    ]  # fmt: skip


def _assert_parts_match_full_draw(src: CanvasSource, batch: int, parts: list[slice]) -> None:
    """Rows ``part`` of a global draw equal those rows of the full draw; the generator advances alike."""
    full_gen = torch.Generator().manual_seed(11)
    full, full_labels = src.random_batch(batch, full_gen)
    after_full = torch.rand(4, generator=full_gen)
    assert full.shape[0] == full_labels.shape[0] == batch
    for part in parts:
        gen = torch.Generator().manual_seed(11)
        canvases, labels = src.random_batch(batch, gen, part=part)
        assert canvases.shape == full[part].shape and canvases.dtype == torch.uint8
        assert torch.equal(canvases, full[part]) and torch.equal(labels, full_labels[part])
        assert torch.equal(torch.rand(4, generator=gen), after_full)  # every rank's generator stays in step


def test_random_batch_part_is_a_slice_of_the_full_draw(fmnist):
    src = FashionMNISTCanvas(root=fmnist[0], n_clutter=4)
    _assert_parts_match_full_draw(src, 12, [slice(0, 4), slice(4, 12), slice(3, 7), slice(None, None, 2)])


def test_random_batch_part_must_be_a_slice(fmnist, image_root):
    for src in (FashionMNISTCanvas(root=fmnist[0]), ImageFolderCanvas(image_root, image_size=8)):
        with pytest.raises(TypeError, match="slice"):
            src.random_batch(4, torch.Generator().manual_seed(0), part=[0, 1])  # type: ignore[arg-type]


def _png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    _png(root / "dog" / "a.png", (40, 30), (0, 0, 255))
    _png(root / "cat" / "a.PNG", (20, 50), (255, 0, 0))
    _png(root / "cat" / "b.png", (33, 33), (255, 0, 0))
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_classes_and_shapes(image_root):
    src = ImageFolderCanvas(image_root, image_size=16)
    assert isinstance(src, CanvasSource)
    assert src.class_names == ["cat", "dog"] and src.num_classes == 2
    assert len(src) == 3 and src.canvas_shape == (16, 16, 3)
    canvases, labels, indices = src.sample([np.random.default_rng(0)] * 3, indices=[0, 1, 2])
    assert canvases.shape == (3, 16, 16, 3) and canvases.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1] and indices.tolist() == [0, 1, 2]
    assert canvases[2, :, :, 2].min() == 255 and canvases[2, :, :, 0].max() == 0  # dog is blue
    assert canvases[0, :, :, 0].min() == 255  # cat is red


def test_image_folder_grayscale_and_split(tmp_path):
    _png(tmp_path / "train" / "x" / "1.png", (10, 10), (255, 255, 255))
    src = ImageFolderCanvas(tmp_path, image_size=(8, 12), split="train", in_chans=1)
    canvases, labels, _ = src.sample([np.random.default_rng(0)])
    assert canvases.shape == (1, 8, 12, 1) and canvases.min() == 255 and labels.tolist() == [0]


def test_image_folder_center_crop(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20, 0] = 255  # left half red
    img[:, 20:, 2] = 255  # right half blue
    (tmp_path / "c").mkdir()
    Image.fromarray(img).save(tmp_path / "c" / "half.png")
    canvas = ImageFolderCanvas(tmp_path, image_size=16).load(0)
    assert canvas.shape == (16, 16, 3)
    # Shorter side 20 -> 16, width 40 -> 32, center crop keeps columns 8..24: red then blue.
    assert canvas[:, :6, 0].min() > 200 and canvas[:, :6, 2].max() < 50
    assert canvas[:, 10:, 2].min() > 200 and canvas[:, 10:, 0].max() < 50
    # The same image on its side: a tall one is cropped about its middle rows too.
    Image.fromarray(img.transpose(1, 0, 2).copy()).save(tmp_path / "c" / "half.png")
    canvas = ImageFolderCanvas(tmp_path, image_size=16).load(0)
    assert canvas[:6, :, 0].min() > 200 and canvas[:6, :, 2].max() < 50
    assert canvas[10:, :, 2].min() > 200 and canvas[10:, :, 0].max() < 50


def test_corrupt_image_is_skipped(image_root):
    bad = image_root / "dog" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    src = ImageFolderCanvas(image_root, image_size=16)
    bad_index = src.files.index(bad)
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        canvases, labels, indices = src.sample([np.random.default_rng(0)], indices=[bad_index])
    # The redraw may hit the bad file again (1 in 4 here): each hit counts.
    assert src.skipped >= 1 and src.bad_files == {bad}
    assert indices[0] != bad_index and canvases.shape == (1, 16, 16, 3)
    assert labels[0].item() == src.targets[indices[0]]
    assert canvases.max() == 255  # a real image, not a blank
    # Hitting it again is counted but not warned about again.

    before = src.skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src.sample([np.random.default_rng(1)], indices=[bad_index])
    assert src.skipped > before and src.bad_files == {bad}


def test_all_images_corrupt_raises(tmp_path):
    for name in ("a.jpg", "b.png"):
        (tmp_path / "k").mkdir(exist_ok=True)
        (tmp_path / "k" / name).write_bytes(b"garbage")
    src = ImageFolderCanvas(tmp_path, image_size=8)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="2 of 2 files are unreadable"):
        src.sample([np.random.default_rng(0)])


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected layout"):
        ImageFolderCanvas(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders.*expected layout"):
        ImageFolderCanvas(tmp_path / "empty")
    _png(tmp_path / "flat" / "x.png", (4, 4), (1, 2, 3))
    with pytest.raises(ValueError, match="found 1 images directly"):
        ImageFolderCanvas(tmp_path / "flat")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderCanvas(tmp_path / "noimg")
    _png(tmp_path / "extra" / "zebra" / "x.png", (4, 4), (1, 2, 3))
    with pytest.raises(ValueError, match="zebra"):
        ImageFolderCanvas(tmp_path / "extra", classes=["cat", "dog"])


def test_explicit_classes_order(tmp_path):
    _png(tmp_path / "b" / "x.png", (4, 4), (1, 2, 3))
    src = ImageFolderCanvas(tmp_path, image_size=4, classes=["z", "b", "a"], class_names=["Z", "B", "A"])
    assert src.num_classes == 3 and src.class_names == ["Z", "B", "A"]
    assert src.targets.tolist() == [1]


def test_image_folder_random_batch_parts(image_root):
    """The base class's random_batch: one global draw, each part decodes only its rows."""
    src = ImageFolderCanvas(image_root, image_size=16)
    _assert_parts_match_full_draw(src, 10, [slice(0, 3), slice(3, 10), slice(5, 6)])
    canvases, labels = src.random_batch(10, torch.Generator().manual_seed(0))
    assert canvases.shape == (10, 16, 16, 3) and labels.dtype == torch.int64
    # Labels belong to the drawn images: dog (label 1) is blue, cat (label 0) is red.
    assert torch.equal(labels == 1, canvases[:, 0, 0, 2] == 255)
    other, _ = src.random_batch(10, torch.Generator().manual_seed(1))
    assert not torch.equal(other, canvases)


def test_image_folder_random_batch_redraws_unreadable_images_alike(image_root):
    """A row that hits an unreadable file redraws with its own drawn seed: the same in every part."""
    (image_root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    src = ImageFolderCanvas(image_root, image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _assert_parts_match_full_draw(src, 16, [slice(0, 5), slice(5, 16), slice(9, 12)])
    assert src.skipped > 0 and src.bad_files == {image_root / "dog" / "broken.jpg"}


class _CountingSource(CanvasSource):
    """A minimal source: canvas i is filled with i; records how many rows each sample() call loads."""

    def __init__(self, n: int) -> None:
        self.n, self.device, self.loaded = n, torch.device("cpu"), []

    num_classes = property(lambda self: self.n)
    class_names = property(lambda self: [str(i) for i in range(self.n)])
    canvas_shape = property(lambda self: (2, 2, 1))

    def __len__(self) -> int:
        return self.n

    def to(self, device):
        return self

    def sample(self, rngs, indices=None):
        used = np.array(
            [int(r.integers(self.n)) if i is None else i for r, i in zip(rngs, indices or [None] * len(rngs))]
        )
        self.loaded.append(len(rngs))
        canvases = torch.from_numpy(used.astype(np.uint8))[:, None, None, None].expand(-1, 2, 2, 1)
        return canvases, torch.from_numpy(used), used


def test_default_random_batch_loads_only_its_part():
    src = _CountingSource(50)
    full, labels = src.random_batch(8, torch.Generator().manual_seed(0))
    assert src.loaded == [8] and torch.equal(full[:, 0, 0, 0].long(), labels)
    mine, _ = src.random_batch(8, torch.Generator().manual_seed(0), part=slice(2, 5))
    assert src.loaded == [8, 3] and torch.equal(mine, full[2:5])


def test_canvas_source_is_abstract():
    class Incomplete(CanvasSource):
        def __len__(self) -> int:
            return 0

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]


def test_imagenet_needs_root(monkeypatch):
    monkeypatch.delenv("AVEX_IMAGENET", raising=False)
    with pytest.raises(ValueError, match="AVEX_IMAGENET") as info:
        imagenet_canvas()
    assert "root=" in str(info.value) and "n01440764" in str(info.value)


def test_imagenet_labels_follow_timm(tmp_path, monkeypatch):
    _png(tmp_path / "val" / "n01443537" / "g.JPEG", (8, 8), (0, 255, 0))
    _png(tmp_path / "val" / "n01440764" / "t.JPEG", (8, 8), (255, 0, 0))
    monkeypatch.setenv("AVEX_IMAGENET", str(tmp_path))
    src = imagenet_canvas(image_size=8)
    assert src.num_classes == 1000 and len(src.class_names) == 1000
    assert src.class_names[0].startswith("tench") and src.class_names[1].startswith("goldfish")
    _, labels, indices = src.sample([np.random.default_rng(0)] * 2, indices=[0, 1])
    names = [src.files[i].parent.name for i in indices]
    assert dict(zip(names, labels.tolist())) == {"n01440764": 0, "n01443537": 1}


def test_imagenet_rejects_unknown_wnid(tmp_path):
    _png(tmp_path / "val" / "n99999999" / "x.JPEG", (8, 8), (0, 0, 0))
    with pytest.raises(ValueError, match="n99999999.*not ImageNet-1k"):
        imagenet_canvas(tmp_path, split="val")


def test_image_folder_names_a_file_root_an_empty_class_and_a_huge_canvas(image_root, tmp_path):
    """A root that is a file was "does not exist"; a class folder without images was a class no episode shows
    (silently: often images of another extension); a canvas over PIL's pixel bound ran out of memory."""
    with pytest.raises(FileNotFoundError, match="a.png is a file, not a folder"):
        ImageFolderCanvas(image_root / "dog" / "a.png")
    (image_root / "emu").mkdir()
    (image_root / "emu" / "e.tiff").write_bytes(b"II*\0")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['emu'\] in .* hold no image files"):
        ImageFolderCanvas(image_root, image_size=8)
    src = ImageFolderCanvas(image_root, image_size=8, classes=["cat", "dog", "emu"])  # a given class list: a subset
    assert src.num_classes == 3 and len(src) == 3
    with pytest.raises(ValueError, match="over PIL.Image.MAX_IMAGE_PIXELS"):
        ImageFolderCanvas(image_root, image_size=(20000, 20000), classes=["cat", "dog", "emu"])
    assert ImageFolderCanvas(image_root, image_size=(1, 9000), classes=["cat", "dog", "emu"]).image_size == (1, 9000)
    with pytest.raises(FileNotFoundError, match="ImageNet root .*a.png is a file, not a folder"):
        imagenet_canvas(image_root / "dog" / "a.png")
    with pytest.raises(FileNotFoundError, match="ImageNet folder .*train does not exist: expected layout"):
        imagenet_canvas(tmp_path, split="train")
    (tmp_path / "val").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="ImageNet folder .*val is a file, not a folder: expected layout"):
        imagenet_canvas(tmp_path, split="val")


def test_fashion_mnist_command_refuses_on_one_line_when_it_cannot_fetch(
    no_data_anywhere, monkeypatch, tmp_path, capsys
):
    """Offline or without apt-get, `avex data fashion-mnist` was a RuntimeError traceback (exit 1); a --dest that
    is a file failed only after the download. Now one line, exit 2, naming where it looked and what to pass."""
    from avex.cli import main

    monkeypatch.setattr(installer.shutil, "which", lambda tool: None)
    monkeypatch.setenv("AVEX_FASHION_MNIST", str(tmp_path / "mine"))
    assert main(["data", "fashion-mnist", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avex data fashion-mnist: error: Fashion-MNIST is in none of ") and err.count("\n") == 1
    assert str(tmp_path / "mine") in err and "`apt-get` is not available" in err and "AVEX_FASHION_MNIST" in err
    (tmp_path / "afile").write_text("x")

    def no_fetch(*args, **kwargs):
        raise AssertionError("must not fetch for a --dest it cannot write")

    monkeypatch.setattr(installer, "_unpack_deb", no_fetch)
    monkeypatch.setattr(installer.shutil, "which", lambda tool: "/usr/bin/" + tool)
    assert main(["data", "fashion-mnist", "--dest", str(tmp_path / "afile")]) == 2
    assert f"--dest {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    # a folder to be made under a file: mkdir raised FileExistsError, a traceback after the download
    assert main(["data", "fashion-mnist", "--dest", str(tmp_path / "afile" / "fm")]) == 2
    assert f"--dest '{tmp_path / 'afile' / 'fm'}': '{tmp_path / 'afile'}' exists and is not a folder" in (
        capsys.readouterr().err
    )
    assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "mine").exists()
