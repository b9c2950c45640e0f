"""Seeded episodes stay bit-for-bit the same (issue 15): a change that speeds a step up must not alter one.

Each scenario plays seeded episodes with fixed actions and hashes every output array, in order, with its key,
dtype and shape: observations, rewards, flags and infos (``final_obs`` and ``final_info`` included), for the
single env, the vector env in both autoreset modes with NumPy and torch outputs, continuous actions, a
partial reset, truncation and rows out of step. The digests recorded in ``episodes_digest.json`` came from
the tree before the host-side work of issue 15 was cut; on the CPU with one torch thread and the pinned
torch they are exact, per platform (torch build, CPU kernel set, machine, CPU vendor and the features that choose
kernels): elsewhere the test is skipped.
A deliberate change of episodes (new draws, another model numerics or torch pin) records new ones with
``AVEX_RECORD_EPISODES=1 pytest tests/test_env_episodes.py`` and says so in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from envs.ave_env import AVEEnv
from envs.vector import AVEVectorEnv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORD = Path(__file__).with_name("episodes_digest.json")  # {platform: {scenario: SHA-256}}
# The CPU's features that choose oneDNN's and PyTorch's kernels beyond the capability torch reports: two AVX-512 CPUs
# (an AMD EPYC and an Intel Xeon with AMX) gave different digests from the same tree.
_FEATURES = ("avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")


def _cpu() -> str:
    """The CPU's vendor and its kernel-choosing features, from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return " ".join([fields.get("vendor_id", "unknown vendor"), *(f for f in _FEATURES if f in flags)])


PLATFORM = f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {platform.machine()}, {_cpu()}"
TINY = dict(
    checkpoint=None,
    pretrained=False,
    model="vit_tiny_patch16_224",
    model_kwargs=dict(depth=2, embed_dim=32, num_heads=2),
)
N = 5


def _update(h: Any, tree: Any, path: str = "") -> None:
    """Feed every array of a nested output into the hash, with its path, dtype and shape."""
    if isinstance(tree, dict):
        for k in tree:
            _update(h, tree[k], f"{path}/{k}")
    elif isinstance(tree, (tuple, list)):
        for i, v in enumerate(tree):
            _update(h, v, f"{path}/{i}")
    elif isinstance(tree, np.ndarray) and tree.dtype == object:
        for i, v in enumerate(tree):
            _update(h, v, f"{path}[{i}]")
    elif tree is None:
        h.update(f"{path}:None".encode())
    else:
        a = tree.cpu().numpy() if isinstance(tree, torch.Tensor) else np.asarray(tree)
        h.update(f"{path}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())


def _actions(t: int, mode: str, n: int) -> np.ndarray:
    if mode == "continuous":
        return ((np.arange(3 * n).reshape(n, 3) * 0.137 + t * 0.291) % 1.0).astype(np.float32)
    return np.array([(7 * t + 13 * e + 3) % 169 for e in range(n)])


def _vector(kw: dict[str, Any], mode: str = "discrete", **extra: Any) -> Callable[[Any], None]:
    """A vector-env scenario: two seeded resets, a partial one, steps across autoresets and truncation."""

    def play(h: Any) -> None:
        venv = AVEVectorEnv(num_envs=N, action_mode=mode, **kw, **extra)
        _update(h, venv.reset(seed=3))
        _update(h, venv.reset(options={"reset_mask": np.arange(N) % 2 == 1}))  # rows out of step
        for t in range(11):
            _update(h, venv.step(_actions(t, mode, N)))
            if t == 5:
                _update(h, venv.reset(seed=[9, None, 4, None, 1], options={"reset_mask": np.arange(N) < 3}))
        if mode == "discrete":
            _update(h, venv.action_masks())

    return play


def _single(kw: dict[str, Any], mode: str = "discrete") -> Callable[[Any], None]:
    def play(h: Any) -> None:
        env = AVEEnv(action_mode=mode, **kw)
        for seed in (0, 7):
            _update(h, env.reset(seed=seed))
            for t in range(kw["budget"]):
                _update(h, env.step(_actions(t, mode, 1)[0]))

    return play


SCENARIOS: dict[str, Callable[[dict[str, Any]], Callable[[Any], None]]] = {
    "single": _single,
    "single_continuous": lambda kw: _single(kw, "continuous"),
    "same_step_numpy": lambda kw: _vector(kw, max_episode_steps=3),
    "same_step_torch": lambda kw: _vector(kw, torch_obs=True),
    "next_step_numpy": lambda kw: _vector(kw, autoreset_mode="next_step", max_episode_steps=3),
    "next_step_torch": lambda kw: _vector(kw, autoreset_mode="next_step", torch_obs=True),
    "same_step_continuous": lambda kw: _vector(kw, "continuous", torch_obs=True),
    "strict_numpy": lambda kw: _vector(kw, strict=True),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_seeded_episodes_are_unchanged(fake_fmnist_root: Path, name: str) -> None:
    kw = dict(gym.spec("AVE-FashionMNIST-v0").kwargs, **TINY, root=str(fake_fmnist_root), budget=4)
    h = hashlib.sha256()
    SCENARIOS[name](kw)(h)
    digest = h.hexdigest()
    every = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    if os.environ.get("AVEX_RECORD_EPISODES") == "1":
        every.setdefault(PLATFORM, {})[name] = digest
        RECORD.write_text(json.dumps(every, indent=1, sort_keys=True) + "\n")
    if PLATFORM not in every:
        # Float results differ between torch builds and CPU kernels (AVX2, AVX-512): digests hold per platform.
        pytest.skip(f"no digests recorded for {PLATFORM} (recorded: {sorted(every)}); see this module's docstring")
    recorded = every[PLATFORM]
    assert recorded.get(name) == digest, (
        f"the {name!r} episodes changed (recorded {recorded.get(name)}, now {digest}): a speed-up must keep every "
        "seeded episode bit-for-bit; see this module's docstring for a deliberate change"
    )


def test_the_digest_sees_a_one_bit_change(fake_fmnist_root: Path) -> None:
    """The hash covers float outputs to the last bit: a reward one ulp off changes it."""
    out = (np.float64(0.5), {"probs": np.float32([0.25, 0.75])})
    a, b = hashlib.sha256(), hashlib.sha256()
    _update(a, out)
    _update(b, (np.nextafter(np.float64(0.5), 1.0), out[1]))
    assert a.hexdigest() != b.hexdigest()
