"""Shared test set-up: offline hub, one torch thread, fake data sets written by the tests."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub call fails at once instead of after a long time-out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny
    models gain nothing from two, and two OpenMP threads slow down many times when other processes share the
    machine's two cores. Restored for the other modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def break_kernel(monkeypatch: pytest.MonkeyPatch):
    """``break_kernel(module, name)``: the Triton kernel entry ``module.name`` fails as on a machine without a C
    compiler, Triton counts as importable, CPU tensors take the kernel path (its interpreter), and no kernel has
    failed yet (:mod:`avex.kernel_fallback`'s record starts empty)."""
    import avex.kernel_fallback as kf

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler")

    def apply(module: object, name: str) -> None:
        monkeypatch.setattr(module, name, broken)
        monkeypatch.setattr(kf, "_kernel_failures", {})
        monkeypatch.setattr(kf, "triton", kf.triton or object())
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    return apply


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a gzip'd IDX file (magic 0x0800 + ndim: 2051 images, 2049 labels)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fake_fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake Fashion-MNIST: 40 train / 20 test random items with labels 0..9."""
    root = tmp_path_factory.mktemp("fake-fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake Fashion-MNIST whose classes can be learnt (``train_kit.write_learnable_fmnist``): 80 train, 20 test."""
    from train_kit import write_learnable_fmnist  # here: the modules that never train skip avex.train's imports

    return write_learnable_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="session")
def single_run(fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``train_classifier``'s summary of the training tests' tiny run in this process, once for the session:
    every DDP test compares its processes with it."""
    from train_kit import single_config

    from avex.train import train_classifier

    assert "WORLD_SIZE" not in os.environ
    return train_classifier(single_config(fmnist_root, tmp_path_factory.mktemp("single") / "ck"))
