"""Prepared image stores (``avex data prepare``, :mod:`avex.data.store`): the same pixels, bad files, draws,
episodes and training batches as decoding; stale stores and large folders without one are named; the CLI."""

from __future__ import annotations

import os
import warnings
from collections import namedtuple
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image

import avex  # noqa: F401  (registers the env ids)
import avex.data.store as store_mod
from avex.cli import build_parser, main
from avex.data import ImageFolderCanvas, ImageStore, get_dataset, imagenet_canvas, prepare_folder
from avex.data.folder import _load_image
from avex.data.imagenet import imagenet_classes
from avex.data.store import STORE_DIR_ENV
from avex.train.config import TrainConfig, resolve_config
from avex.train.data import load_train_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DiskUsage = namedtuple("DiskUsage", "total used free")

SIZE = (12, 16)  # (H, W): not square, so a swapped side would show
TINY: dict[str, Any] = dict(
    pretrained=False, model="vit_tiny_patch16_224", model_kwargs=dict(depth=2, embed_dim=32, num_heads=2)
)


def _jpeg(path: Path, seed: int, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """root/val/{cat,dog,emu}/: 4 JPEGs of different sizes each, a 16-bit PNG, and one file that is no image."""
    data = tmp_path / "data"
    for c, name in enumerate(("cat", "dog", "emu")):
        for i in range(4):
            _jpeg(data / "val" / name / f"{i}.jpg", seed=10 * c + i, size=(20 + 9 * i, 14 + 6 * c))
    wide = (np.arange(30 * 20).reshape(20, 30) * 100).astype(np.uint16)
    Image.fromarray(wide).save(data / "val" / "emu" / "wide.png")  # 16 bits: scaled to 8, as decoding does
    (data / "val" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    return data


def _sources(root: Path, **kw: Any) -> tuple[ImageFolderCanvas, ImageFolderCanvas]:
    """(decoding, reading the store), on the same folder."""
    return (
        ImageFolderCanvas(root, SIZE, split="val", store=False, **kw),
        ImageFolderCanvas(root, SIZE, split="val", **kw),
    )


@pytest.mark.parametrize(("in_chans", "workers"), [(3, 1), (1, 2)])
def test_store_holds_the_decoded_pixels_and_the_unreadable_files(root, in_chans, workers):
    path = prepare_folder(root, "val", SIZE, in_chans, workers=workers, progress=False)
    assert path == root / "val" / ".avex-store" / f"{SIZE[0]}x{SIZE[1]}x{in_chans}"
    plain, stored = _sources(root, in_chans=in_chans)
    assert plain.store is None and stored.store is not None and stored.store.path == path
    assert stored.store.images.shape == (len(plain), *SIZE, in_chans)
    mode = "RGB" if in_chans == 3 else "L"
    bad = []
    for i, file in enumerate(plain.files):
        try:
            want = _load_image(file, SIZE, mode)
        except Exception as err:
            bad.append(i)
            with pytest.raises(OSError, match=str(err)[:20]):
                stored.load(i)
            continue
        assert np.array_equal(stored.load(i), want), file
        assert np.array_equal(plain.load(i), want)
    assert [plain.files[i].name for i in bad] == ["broken.jpg"]
    meta = stored.store.meta
    assert meta["files"] == [f.relative_to(root / "val").as_posix() for f in plain.files]
    assert meta["targets"] == plain.targets.tolist() and meta["classes"] == ["cat", "dog", "emu"]
    assert [i for i, _ in meta["bad"]] == bad
    assert not list((root / "val" / ".avex-store").glob(".*"))  # no temporary left behind


def _np(x: Any) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _draw(source: ImageFolderCanvas, seeds: range) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = source.sample_counting_skips([np.random.default_rng(s) for s in seeds])
    return out, [str(w.message) for w in caught]


def test_seeded_draws_are_the_same_with_and_without_the_store(root):
    prepare_folder(root, "val", SIZE, workers=1, progress=False)
    plain, stored = _sources(root)
    (a, a_warned), (b, b_warned) = _draw(plain, range(200)), _draw(stored, range(200))
    for x, y in zip(a, b):
        assert np.array_equal(_np(x), _np(y))
    assert a[3].sum() > 0 and a_warned == b_warned and len(a_warned) == 1  # the broken file, warned about once
    assert plain.bad_files == stored.bad_files and plain.skipped == stored.skipped > 0
    given = [0, 5, len(plain) - 1]  # indices given, as training and evaluation draw them
    rngs = [np.random.default_rng(0)] * 3
    assert torch.equal(plain.sample(rngs, given)[0], stored.sample(rngs, given)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("on_device", ["1", "0"])
def test_cuda_canvases_from_the_store_on_the_device_or_the_host(root, monkeypatch, on_device):
    monkeypatch.setenv("AVEX_STORE_ON_DEVICE", on_device)
    prepare_folder(root, "val", SIZE, workers=1, progress=False)
    plain, stored = _sources(root)
    stored.to("cuda")
    (a, _), (b, _) = _draw(plain, range(300)), _draw(stored, range(300))
    assert b[0].is_cuda and b[1].is_cuda
    for x, y in zip(a, b):
        assert np.array_equal(_np(x), _np(y))
    resident = stored.store._device[torch.device("cuda", torch.cuda.current_device())]
    assert (resident is not None) == (on_device == "1")


def _episodes(root: Path) -> list[Any]:
    """Observations, rewards and infos of 3 seeded episodes of 3 vector envs (autoresets included)."""
    venv = gym.make_vec(
        "AVE-ImageFolder-v0", num_envs=3, root=str(root), split="val", image_size=32, patch=8, budget=3, **TINY
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out: list[Any] = [venv.reset(seed=7)]
        for t in range(9):
            out.append(venv.step(np.full(3, t % 4)))
    venv.close()
    return out


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, np.ndarray) and a.dtype == object:  # Gymnasium's per-env final infos
        _assert_same(list(a.ravel()), list(np.asarray(b).ravel()))
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_seeded_env_episodes_are_the_same_with_and_without_the_store(root):
    decoded = _episodes(root)
    path = prepare_folder(root, "val", 32, workers=1, progress=False)
    stored = _episodes(root)
    _assert_same(decoded, stored)
    assert ImageStore.open(path).bad  # the broken file is in the store's list, and was drawn the same way
    assert sum(info["skipped_images"].sum() for *_, info in decoded[1:]) + decoded[0][1]["skipped_images"].sum() > 0


def test_training_batches_are_the_same_with_and_without_the_store(root):
    cfg = resolve_config(
        TrainConfig(
            dataset="folder", data_root=str(root), train_split="val", val_split="val", img_size=32, batch_size=6
        )
    )

    def batches() -> list[torch.Tensor]:
        data = load_train_data(cfg, 0, 1, torch.device("cpu"))
        gen = torch.Generator().manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = [t for step in range(3) for t in data.next_batch(step, gen)]
        data.close()
        return out

    decoded = batches()
    prepare_folder(root, "val", 32, workers=1, progress=False)
    assert get_dataset("folder").make_source(root=root, split="val", image_size=32).store is not None
    for x, y in zip(decoded, batches()):
        assert torch.equal(x, y)


def test_imagenet_reads_the_folder_store_in_its_own_label_order(tmp_path):
    wnids = imagenet_classes()[0]
    for name in (wnids[500], wnids[7]):  # sorted folders: 7 then 500
        for i in range(2):
            _jpeg(tmp_path / "val" / name / f"{i}.JPEG", seed=i, size=(30, 20))
    prepare_folder(tmp_path, "val", 16, workers=1, progress=False)
    plain = imagenet_canvas(tmp_path, "val", 16, store=False)
    source = imagenet_canvas(tmp_path, "val", 16)
    assert source.store is not None and source.store.meta["targets"] == [0, 0, 1, 1]  # the folder's own order
    rngs = [np.random.default_rng(0)] * 4
    for x, y in zip(plain.sample(rngs, [0, 1, 2, 3]), source.sample(rngs, [0, 1, 2, 3])):
        assert np.array_equal(_np(x), _np(y))
    assert source.sample(rngs, [0, 1, 2, 3])[1].tolist() == [7, 7, 500, 500]  # timm's labels


def test_a_changed_folder_makes_the_store_stale(root):
    path = prepare_folder(root, "val", SIZE, workers=1, progress=False)
    _jpeg(root / "val" / "cat" / "new.jpg", seed=99, size=(20, 20))
    with pytest.warns(UserWarning, match="out of date.*avex data prepare") as caught:
        source = ImageFolderCanvas(root, SIZE, split="val")
    assert source.store is None and str(root / "val") in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        ImageFolderCanvas(root, SIZE, split="val")
    with pytest.raises(ValueError, match="does not hold"):
        ImageFolderCanvas(root, SIZE, split="val", store=path)  # a store asked for by name must fit
    prepare_folder(root, "val", SIZE, workers=1, progress=False)  # rebuilt in place
    assert ImageFolderCanvas(root, SIZE, split="val").store is not None
    os.utime(root / "val" / "cat" / "0.jpg", ns=(1, 1))  # same name and size, another time: stale again
    with pytest.warns(UserWarning, match="changed since"):
        assert ImageFolderCanvas(root, SIZE, split="val").store is None
    prepare_folder(root, "val", SIZE, workers=1, progress=False)
    with open(path / "images.u8", "r+b") as f:  # a damaged store is stale, not a crash
        f.truncate(10)
    with pytest.warns(UserWarning, match="not a usable image store"):
        assert ImageFolderCanvas(root, SIZE, split="val").store is None


def test_a_large_folder_without_a_store_names_the_command(root, monkeypatch):
    monkeypatch.setattr(store_mod, "_HINT_IMAGES", 5)
    with pytest.warns(UserWarning, match="no prepared store") as caught:
        ImageFolderCanvas(root, SIZE, split="val", in_chans=1)
    assert f"avex data prepare {root / 'val'} --image-size 12 16 --channels 1" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageFolderCanvas(root, SIZE, split="val", store=False)  # asked not to use one: nothing to say


def test_store_dir_for_read_only_data(root, tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_DIR_ENV, str(tmp_path / "stores"))
    path = prepare_folder(root, "val", SIZE, workers=1, progress=False)
    assert path.is_relative_to(tmp_path / "stores") and not (root / "val" / ".avex-store").exists()
    assert ImageFolderCanvas(root, SIZE, split="val").store is not None
    monkeypatch.delenv(STORE_DIR_ENV)
    assert ImageFolderCanvas(root, SIZE, split="val", store=path).store is not None  # or named


def test_bad_arguments_are_refused(root):
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        prepare_folder(root, "val", SIZE, workers=0, progress=False)
    with pytest.raises(ValueError, match="store must be True, False or a store directory"):
        ImageFolderCanvas(root, SIZE, split="val", store=3)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="no image store"):
        ImageFolderCanvas(root, SIZE, split="val", store=root)


def test_no_room_for_the_store_is_refused_before_decoding(root, monkeypatch, capsys):
    import avex.data.prepare as prepare_mod

    monkeypatch.setattr(prepare_mod.shutil, "disk_usage", lambda _: DiskUsage(total=1, used=1, free=0))
    with pytest.raises(ValueError, match=f"needs .* GB .* free: pass --out DIR or set {STORE_DIR_ENV}"):
        prepare_folder(root, "val", SIZE, workers=1, progress=False)
    assert not any((root / "val" / ".avex-store").iterdir())  # nothing half-written
    assert main(["data", "prepare", str(root), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("avex data prepare: error: the store needs")


def test_cli_prepares_every_split_and_refuses_a_missing_root(root, tmp_path, capsys):
    assert main(["data", "prepare", str(root), "--image-size", "12", "16", "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "14 images (1 unreadable)" in out and str(root / "val" / ".avex-store" / "12x16x3") in out
    assert ImageFolderCanvas(root, SIZE, split="val").store is not None
    for argv in (["data", "prepare", str(tmp_path / "nowhere")], ["data", "prepare", str(root), "--image-size", "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("avex data prepare: error: ") and err.count("\n") == 1
    # avex data fashion-mnist keeps its flags, before or after the name
    for flags in (["fashion-mnist", "--dest", "d", "--quiet"], ["--dest", "d", "--quiet", "fashion-mnist"]):
        args = build_parser().parse_args(["data", *flags])
        assert (args.what, args.dest, args.quiet) == ("fashion-mnist", "d", True)


def _written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".avex-store" in p.parts)


def test_meaningless_sizes_and_layouts_are_refused_before_anything_is_written(root, tmp_path, capsys):
    """A canvas over PIL's pixel bound (100000 px a side was killed for memory with a 60 GB temporary store left
    behind), a class folder without images, a root or --out that is a file: one line, no store written."""
    (root / "val" / "yak").mkdir()
    (root / "val" / "yak" / "notes.txt").write_text("images still to come")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['yak'\] in .* hold no image files"):
        prepare_folder(root, "val", SIZE, workers=1, progress=False)
    (root / "val" / "yak" / "notes.txt").unlink()
    (root / "val" / "yak").rmdir()
    with pytest.raises(ValueError, match=r"image_size \(100000, 100000\) is 10,000,000,000 pixels .*MAX_IMAGE_PIXELS"):
        prepare_folder(root, "val", 100000, workers=1, progress=False)
    (tmp_path / "afile").write_text("x")
    image = root / "val" / "cat" / "0.jpg"
    for argv, message in (
        (["--image-size", "100000"], "over PIL.Image.MAX_IMAGE_PIXELS"),
        (["--out", str(tmp_path / "afile")], f"--out {tmp_path / 'afile'} is a file, not a folder"),
    ):
        assert main(["data", "prepare", str(root), "--quiet", "--workers", "1", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("avex data prepare: error: ") and err.count("\n") == 1 and message in err, err
    assert main(["data", "prepare", str(image), "--quiet"]) == 2
    assert f"image folder {image} is a file, not a folder" in capsys.readouterr().err
    assert _written(root) == [] and (tmp_path / "afile").read_text() == "x"


def test_a_store_whose_meta_is_not_a_json_object_is_named(root, tmp_path):
    """meta.json holding a JSON list was an AttributeError traceback, even where a store is only looked for."""
    path = prepare_folder(root, "val", SIZE, workers=1, progress=False)
    (path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"is not a usable image store \(meta.json holds a JSON list, not an object\)"):
        ImageFolderCanvas(root, SIZE, split="val", store=path)
    with pytest.warns(UserWarning, match="out of date .* JSON list"):
        assert ImageFolderCanvas(root, SIZE, split="val").store is None  # decodes, naming the rebuild command


def test_a_folder_of_undecodable_files_gets_no_store(tmp_path: Path) -> None:
    """Every file unreadable: refused, naming the folder and a file's error, and no store (nor its temporary) left."""
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        (data / "val" / name).mkdir(parents=True)
        (data / "val" / name / "0.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "stores"
    with pytest.raises(ValueError, match=r"none of the 2 images under .*val could be decoded \(e\.g\. .*0\.jpg"):
        prepare_folder(data, "val", SIZE, workers=1, out=out, progress=False)
    assert not [p for p in out.rglob("*") if p.is_file()]  # at most the empty folder the store would go in
