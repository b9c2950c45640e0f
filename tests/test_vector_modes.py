"""Gymnasium's own vectorisation modes agree with avex's native vector env, forked workers included."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from reliability_kit import tiny_checkpoint

N, SEED = 2, 11


@pytest.fixture(scope="module")
def kwargs(fake_fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    # Saved weights, so that every process (the forked workers too) runs the same model.
    path = tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")
    return dict(root=str(fake_fmnist_root), checkpoint=str(path), split="test")


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: forked workers that deadlock never answer."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer from the vector env within {seconds} s (a deadlocked worker?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def rollout(venv: gym.vector.VectorEnv, steps: int) -> list[tuple]:
    """Observations and rewards of ``steps`` steps with fixed, distinct actions per env."""
    obs, _ = venv.reset(seed=SEED)
    out = [({k: np.asarray(v).copy() for k, v in obs.items()}, None)]
    for t in range(steps):
        obs, reward, *_ = venv.step(np.array([7 * t + i for i in range(N)]))
        out.append(({k: np.asarray(v).copy() for k, v in obs.items()}, np.asarray(reward).copy()))
    return out


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_gymnasium_modes_match_the_native_env(kwargs: dict, mode: str) -> None:
    steps = gym.spec("AVE-FashionMNIST-v0").kwargs["budget"] - 1  # within the first episode (no autoreset)
    gym.make("AVE-FashionMNIST-v0", **kwargs).reset(seed=0)  # the parent's thread pool is live before the fork
    native = rollout(gym.make_vec("AVE-FashionMNIST-v0", num_envs=N, **kwargs), steps)
    with time_limit(120):
        other_env = gym.make_vec("AVE-FashionMNIST-v0", num_envs=N, vectorization_mode=mode, **kwargs)
        try:
            other = rollout(other_env, steps)
        finally:
            other_env.close(terminate=True)
    for (obs_a, rew_a), (obs_b, rew_b) in zip(native, other):
        for key in obs_a:
            np.testing.assert_allclose(obs_a[key], obs_b[key], rtol=1e-5, atol=1e-5, err_msg=key)
        if rew_a is not None:
            np.testing.assert_allclose(rew_a, rew_b, rtol=1e-5, atol=1e-6)
