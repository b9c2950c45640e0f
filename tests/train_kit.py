"""Shared pieces of the training tests (tests/test_train.py, test_ddp_nodes.py, test_train_allreduce.py): fake
Fashion-MNIST with a learnable class pattern, the tiny run that one process trains in the test and ``torchrun``
trains as a command, the check that the processes' weights equal the one process's, and launchers with a time-out
that ends every process they started."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import write_idx
from safetensors.torch import load_file

from avex import data
from avex.train import TrainConfig, build_classifier, init_sincos_pos_embed, resolve_config
from avex.train.runtime import teardown_distributed

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
    # PYTHONFAULTHANDLER: a process that gets SIGABRT prints every thread's stack (see run_launchers).
    env = dict(PYTHONPATH=python_path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    return dict(os.environ, **env)


def _descendants(pids: list[int]) -> list[int]:
    """Every live process below ``pids`` (children, their children, ...), read from /proc; [] without /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the fields after "(comm)": state, ppid
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(pids)
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _end(pids: list[int]) -> None:
    """SIGABRT (with faulthandler on, a Python process prints its threads' stacks), then SIGKILL, to each pid."""
    for sig in (signal.SIGABRT, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2.0 if sig == signal.SIGABRT else 0.0)  # time to write the stacks


def run_launchers(cmds: list[list[str]], cwd: Path, timeout_s: float) -> list[tuple[int, str]]:
    """Run ``torchrun`` commands side by side (each logging to a file in ``cwd``): (exit status, log) of each.

    torchrun starts each worker in a session of its own, so a time-out that ends only the launchers (or their
    process groups) leaves workers running that wait on their peers. On time-out every process below a
    launcher, found before any is signalled, gets SIGABRT then SIGKILL, and the test fails with every log:
    under :func:`torchrun_env` a Python process prints its threads' stacks on SIGABRT, so the log says where
    each one waited.
    """
    procs, logs = [], []
    for i, cmd in enumerate(cmds):
        log = cwd / f"launcher{i}.log"
        with log.open("wb") as f:  # a file, not a pipe: a full pipe would stall the process
            procs.append(subprocess.Popen(cmd, env=torchrun_env(), cwd=cwd, stdout=f, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + timeout_s
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.0)) for p in procs]
    except subprocess.TimeoutExpired:
        launchers = [p.pid for p in procs if p.poll() is None]
        _end(_descendants(launchers) + launchers)
        for p in procs:
            p.wait()
        text = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}" for log in logs)
        pytest.fail(f"torchrun did not finish within {timeout_s:.0f} s; every process was ended:\n{text}")
    return [(code, log.read_text(errors="replace")) for code, log in zip(codes, logs)]


def _with_faulthandler(rank: int, fn: Callable[..., None], *args: Any) -> None:
    faulthandler.enable()  # SIGABRT from spawn_within prints this process's stacks
    fn(rank, *args)


def spawn_within(fn: Callable[..., None], args: tuple, nprocs: int, timeout_s: float) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` with a time-out: on it, each worker's stacks, then the end.

    A worker's exception fails the test as with ``spawn`` (``ProcessRaisedException``); a worker that waits on a
    peer that died or never came would otherwise hang the test run.
    """
    ctx = mp.start_processes(_with_faulthandler, args=(fn, *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            _end([p.pid for p in ctx.processes if p.is_alive() and p.pid is not None])
            pytest.fail(f"the {nprocs} spawned workers did not finish within {timeout_s:.0f} s (stacks above)")


def in_process_group(backend: str, rendezvous: str, rank: int, world: int, body: Callable[[], None]) -> None:
    """Join a ``world``-process group, run ``body``, then leave as the trainer does (``teardown_distributed``).

    ``body``'s objects (a DDP and its reducer, the tensors of its collectives) are freed when it returns, while the
    group is still up. On an exception the group is only destroyed: a barrier would wait on a peer that may be gone.
    """
    dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world)
    try:
        body()
    except BaseException:
        dist.destroy_process_group()
        raise
    teardown_distributed(world)


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
