"""A vector step waits for the device only for what the caller asked for (issue 15, item 2): a CPU proxy.

On CUDA, ``torch.cuda.set_sync_debug_mode`` counts the synchronisations of a step
(``test_env_lazy.py``'s CUDA tests), but this machine has no GPU. Here every call that synchronises the host
with a CUDA device is recorded during plain vector steps (no episode restarts) on the CPU, where every tensor
qualifies: a tensor read on the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``/``int``/``float``/
``index`` of a tensor, ``if tensor:``, any op that reads a value, ``aten._local_scalar_dense``), an output of
data-dependent shape (``nonzero``, ``masked_select``, ``unique``, indexing with a bool mask,
``repeat_interleave`` without ``output_size``), an assignment of a Python number at tensor indices (CUDA's
``index_put_`` copies the number to the device with a blocking copy), a tensor built from host data straight
on a device (``torch.as_tensor(array, device=...)``: a blocking copy from pageable memory) and
``torch.cuda.synchronize``. A step with ``torch_obs=True`` makes none of them; a step with NumPy outputs only
its one transfer (``avex.transfer.to_host``).
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import envs.vector
from envs.vector import AVEVectorEnv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(
    checkpoint=None,
    pretrained=False,
    model="vit_tiny_patch16_224",
    model_kwargs=dict(depth=2, embed_dim=32, num_heads=2),
)
ROOT = str(Path(__file__).resolve().parents[1])
aten = torch.ops.aten
# aten ops that read a device value on the host, or whose output shape depends on device values.
_READS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select, aten._unique2}
_READS |= {aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# CPU-only code that CUDA never runs: TOREViT checks glimpse coordinates given on the CPU (on a device it leaves
# them to the geometry, which checks actions on the host).
_CPU_ONLY = {("avex/embedding.py", "_check_glimpses")}


def _site() -> tuple[str, int, str]:
    """The innermost frame of this repository's code outside the tests: (path, line, function)."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if name.startswith(ROOT) and not any(part in name for part in ("/tests/", "/.venv/", "/site-packages/")):
            return name[len(ROOT) + 1 :], frame.lineno or 0, frame.name
    return "?", 0, "?"


class _Recorder(TorchDispatchMode):
    """Records the aten ops that synchronise on CUDA (see the module docstring) and where they were called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[str, int, str]]] = []

    def note(self, what: str) -> None:
        site = _site()
        if site[::2] not in _CPU_ONLY:
            self.calls.append((what, site))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _READS or (  # repeats as a tensor (an int's is an expand) without output_size: a read
            packet is aten.repeat_interleave
            and func._overloadname in ("Tensor", "self_Tensor")
            and kwargs.get("output_size") is None
        ):
            self.note(str(func))
        elif packet in _INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        ):
            self.note(f"{func} with a bool mask")
        return func(*args, **kwargs)


def _has_tensor(index: Any) -> bool:
    return isinstance(index, torch.Tensor) or (
        isinstance(index, tuple) and any(isinstance(i, torch.Tensor) for i in index)
    )


@contextlib.contextmanager
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, tuple[str, int, str]]]]:
    """Record every synchronising call made inside the block: a list of (what, (path, line, function))."""
    rec = _Recorder()

    def wrap(owner: Any, name: str, when: Any = None) -> None:
        inner = getattr(owner, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            if when is None or when(*args, **kwargs):
                rec.note(f"{getattr(owner, '__name__', owner)}.{name}")
            return inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        wrap(torch.Tensor, name)
    wrap(torch, "nonzero")
    wrap(torch, "masked_select")
    wrap(torch.cuda, "synchronize")
    wrap(torch.Tensor, "__getitem__", lambda t, i: isinstance(i, torch.Tensor) and i.dtype == torch.bool)
    wrap(torch.Tensor, "__setitem__", lambda t, i, v: _has_tensor(i) and not isinstance(v, torch.Tensor))
    for name in ("as_tensor", "tensor"):
        wrap(torch, name, lambda data, *a, **k: k.get("device") is not None and not isinstance(data, torch.Tensor))
    with rec:
        yield rec.calls


@pytest.fixture
def kw(fake_fmnist_root: Path) -> dict[str, Any]:
    return dict(gym.spec("AVE-FashionMNIST-v0").kwargs, **TINY, root=str(fake_fmnist_root), budget=4)


def _plain_steps(venv: AVEVectorEnv, monkeypatch: pytest.MonkeyPatch, steps: int) -> list[str]:
    """The synchronising calls of ``steps`` plain steps (none may restart an episode), each as "what at path
    (function)". The NumPy outputs go to the host in one packed copy, as on CUDA."""
    inner = envs.vector.tree_to_host
    rng = np.random.default_rng(1)
    n = venv.num_envs
    with monkeypatch.context() as m:
        m.setattr(envs.vector, "tree_to_host", lambda tree, pack=None: inner(tree, True))
        with recording(m) as calls:
            for _ in range(steps):
                assert not venv._pending.any() and (venv.engine.steps + 1 < venv.engine.config.budget).all()
                venv.step(rng.integers(0, venv.engine.num_actions, n))
    return [f"{what} at {path}:{line} ({fn})" for what, (path, line, fn) in calls]


@pytest.mark.parametrize("torch_obs", [True, False])
@pytest.mark.parametrize("mode", ["same_step", "next_step"])
@pytest.mark.parametrize("in_step", [True, False], ids=["rows_in_step", "rows_out_of_step"])
def test_plain_vector_step_makes_no_synchronising_call(
    kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch, torch_obs: bool, mode: str, in_step: bool
) -> None:
    """After warm-up (episodes ended and restarted), a plain step makes no synchronising call with torch_obs,
    and with NumPy outputs one: its one transfer's host read; rows out of step (reset at other times) too."""
    n = 6
    venv = AVEVectorEnv(num_envs=n, torch_obs=torch_obs, autoreset_mode=mode, **kw)
    rng = np.random.default_rng(0)
    venv.reset(seed=0)
    for _ in range(kw["budget"] + 1):  # warm-up: every episode ends and restarts
        venv.step(rng.integers(0, venv.engine.num_actions, n))
    venv.reset(seed=1)
    venv.step(rng.integers(0, venv.engine.num_actions, n))
    if not in_step:  # half the rows restart: glimpse counts 1 and 0
        venv.reset(options={"reset_mask": np.arange(n) % 2 == 0})
        assert len(set(venv.engine.steps.tolist())) == 2
    calls = _plain_steps(venv, monkeypatch, 2)
    # The one transfer: to_host reads its packed buffer (on CUDA, the copy into it is the step's one wait).
    own = [c for c in calls if c.startswith("Tensor.numpy at avex/transfer.py:") and c.endswith("(to_host)")]
    assert len(own) == (0 if torch_obs else 2)
    assert [c for c in calls if c not in own] == [], "\n".join(calls)


def test_the_recorder_catches_what_synchronises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind of call the module names is recorded, with the line that made it; plain device work is not."""
    x = torch.arange(6.0)
    idx = torch.tensor([0, 2])
    with recording(monkeypatch) as calls:
        _ = x * 2 + 1, x[idx], x[1:3]  # no record
        x[idx] = x[3:5].clone()  # a tensor value: no record
        plain = len(calls)
        _ = x.sum().item(), x.tolist(), bool(x[0] > 1), float(x[1]), x[x > 2], torch.nonzero(x)
        _ = x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1])), x.unique()
        x[idx] = 0.0
        _ = torch.as_tensor(np.zeros(3), device="cpu")
    assert plain == 0
    kinds = " ".join(what for what, _ in calls)
    for needle in ("item", "tolist", "__bool__", "__float__", "bool mask", "nonzero", "repeat_interleave", "unique"):
        assert needle in kinds, (needle, kinds)
    assert "__setitem__" in kinds and "as_tensor" in kinds
    assert all(site == ("?", 0, "?") for _, site in calls)  # called from the tests: no repository frame


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("torch_obs", [True, False])
def test_plain_step_with_rows_out_of_step_waits_only_for_its_outputs_on_cuda(
    kw: dict[str, Any], torch_obs: bool
) -> None:
    """The CUDA check of the proxy above where ``test_env_lazy.py``'s does not reach: rows reset at other
    times (the token cache scatters at per-row offsets). With torch_obs no call synchronises; with NumPy
    outputs exactly one (the packed copy)."""
    n = 8
    venv = AVEVectorEnv(num_envs=n, device="cuda", torch_obs=torch_obs, **kw)
    rng = np.random.default_rng(0)
    venv.reset(seed=0)
    for _ in range(2):
        venv.step(rng.integers(0, venv.engine.num_actions, n))
    venv.reset(options={"reset_mask": np.arange(n) % 2 == 0})  # glimpse counts 2 and 0
    venv.step(rng.integers(0, venv.engine.num_actions, n))  # warm-up of the scattering step
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            venv.step(rng.integers(0, venv.engine.num_actions, n))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == (0 if torch_obs else 1), syncs


@pytest.mark.parametrize("mode", ["same_step", "next_step"])
def test_partial_restart_synchronises_only_in_the_canvas_source(
    kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Steps that restart some envs (torch_obs) record nothing beyond what the canvas source does to compose
    the new canvases: the restarted rows are cleared with fills at their device indices."""
    n = 6
    venv = AVEVectorEnv(num_envs=n, torch_obs=True, autoreset_mode=mode, **kw)
    rng = np.random.default_rng(0)
    venv.reset(seed=0)
    venv.step(rng.integers(0, venv.engine.num_actions, n))
    venv.reset(options={"reset_mask": np.arange(n) % 2 == 0})  # glimpse counts 1 and 0: the odd rows end first
    with recording(monkeypatch) as calls:
        for _ in range(kw["budget"] + 1):  # the odd rows' episodes end and restart, then the even rows'
            venv.step(rng.integers(0, venv.engine.num_actions, n))
    others = [
        f"{what} at {path}:{line} ({fn})" for what, (path, line, fn) in calls if not path.startswith("avex/data/")
    ]
    assert others == [], "\n".join(others)
