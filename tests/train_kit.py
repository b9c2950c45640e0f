"""Shared pieces of the training tests (tests/test_train.py, tests/test_ddp_nodes.py): fake Fashion-MNIST with a
learnable class pattern, the tiny run that one process trains in the test and ``torchrun`` trains as a command,
and the check that the processes' weights equal the one process's."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import write_idx
from safetensors.torch import load_file

from avex import data
from avex.train import TrainConfig, build_classifier, init_sincos_pos_embed, resolve_config

REPO = Path(__file__).resolve().parents[1]
TINY: dict[str, Any] = dict(depth=2, embed_dim=32, num_heads=2, patch=8, glimpse=2, budget=4)
RUN_STEPS, RUN_BATCH = 4, 8
# The run every DDP test repeats: TrainConfig fields here, the same values as flags under torchrun.
RUN: dict[str, Any] = dict(
    img_size=48, steps=RUN_STEPS, batch_size=RUN_BATCH, lr=3e-3, eval_size=16, eval_batch_size=8, seed=5, **TINY
)


def write_learnable_fmnist(root: Path) -> Path:
    """Fake Fashion-MNIST in ``root``: items whose brightness pattern depends on the class (learnable), gzip IDX."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 80), ("test", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y : 2 * y + 8, 4:24] = 255  # a class-specific bar
        img_name, lab_name = data.FASHION_MNIST_FILES[split]
        write_idx(root / img_name, images)
        write_idx(root / lab_name, labels)
    return root


def cpu_config(root: Path, out: Path, **kw: Any) -> TrainConfig:
    """A short run of the tiny model on the CPU over fake Fashion-MNIST in ``root``; ``kw`` sets or overrides fields."""
    base: dict[str, Any] = dict(
        device="cpu",
        dataset="fashion-mnist",
        data_root=str(root),
        img_size=48,
        steps=3,
        batch_size=RUN_BATCH,
        eval_size=8,
        eval_batch_size=8,
        progress=False,
        out=str(out),
        **TINY,
    )
    return TrainConfig(**dict(base, **kw))


def single_config(fmnist_root: Path, out: Path) -> TrainConfig:
    """The run in one process, on the CPU even where CUDA exists (the DDP tests' gloo processes run there)."""
    return TrainConfig(
        device="cpu",
        dataset="fashion-mnist",
        data_root=str(fmnist_root),
        out=str(out),
        progress=False,
        log_json=str(out.parent / "log.jsonl"),
        log_every=2,
        **RUN,
    )


def torchrun_command(launcher: list[str], fmnist_root: Path, out: Path) -> list[str]:
    """``torchrun <launcher> -m avex.train`` with the run's flags, on the CPU (gloo)."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in RUN.items()]
    return [
        *(sys.executable, "-m", "torch.distributed.run", *launcher),
        *("-m", "avex.train", "--dataset", "fashion-mnist", "--data-root", str(fmnist_root)),
        *("--out", str(out), "--no-progress", "--device", "cpu", *flags),
    ]


def torchrun_env() -> dict[str, str]:
    """The test's environment for torchrun's processes: the checkout importable, offline, one thread each."""
    python_path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return dict(os.environ, PYTHONPATH=python_path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _prefixed(name: str) -> Callable[[str], str]:
    """``assert_close``'s message for tensor ``name``: its own, after the name."""
    return lambda message: f"{name}: {message}"


def assert_same_weights_as_one(one_checkpoint: str, out: Path, world: int) -> None:
    """The weights saved at ``out`` by ``world`` processes equal the one process's, and training moved them."""
    one = load_file(one_checkpoint)
    many = load_file(str(out) + ".safetensors")
    torch.manual_seed(RUN["seed"])  # the run's seed: the same initial weights as both runs
    start = build_classifier(resolve_config(TrainConfig(img_size=RUN["img_size"], **TINY)), 10)
    init_sincos_pos_embed(start)
    init = start.state_dict()
    assert one.keys() == many.keys()
    moved = [k for k in one if not torch.allclose(one[k], init[k].to(one[k].dtype))]
    assert len(moved) > len(one) // 2, "training should have changed the weights"
    for k in one:
        torch.testing.assert_close(many[k], one[k], atol=1e-5, rtol=1e-5, msg=_prefixed(k))
    assert json.loads(Path(f"{out}.json").read_text())["meta"]["world_size"] == world


def tiny_tore(img_size: int = 48, in_chans: int = 1, **kw: Any) -> Any:
    """A 2-block, 32-wide TORE ViT (patch 8, 10 classes) for the training tests; ``kw`` overrides timm's arguments."""
    from avex.model import create_tore

    arch = dict(dict(depth=2, embed_dim=32, num_heads=2), **kw)
    return create_tore(
        "vit_tiny_patch16_224",
        img_size=img_size,
        patch_size=8,
        in_chans=in_chans,
        num_classes=10,
        mean=(0.1,) * in_chans,
        std=(0.25,) * in_chans,
        **arch,
    )
