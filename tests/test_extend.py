"""The extension promise: a data set, an agent and a reward added from this file alone, touching no avex file.

The toy data set registers its own Gymnasium id; the classifier trains on it with ``avex train
classifier``'s code; the env runs the toy reward with the trained checkpoint; ``avex benchmark`` plays
the toy agent against random on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import avex
from agents import GlimpseAgent, register_agent
from avex.cli import main
from avex.data import CanvasSource, DatasetSpec, register_dataset
from envs.rewards import Belief, register_reward

SIDE, CLASSES, ITEMS = 32, 4, 64


class QuadrantCanvas(CanvasSource):
    """Black 32x32 one-channel canvases with one bright 8x8 square; the label is the square's quadrant."""

    def __init__(self, split: str | None, device: str | torch.device = "cpu") -> None:
        rng = np.random.default_rng(0 if split == "train" else 1)
        self.labels = rng.integers(0, CLASSES, ITEMS)
        self.corners = rng.integers(0, SIDE // 2 - 8, (ITEMS, 2)) + (SIDE // 2) * np.stack(
            [self.labels // 2, self.labels % 2], axis=1
        )
        self.device = torch.device(device)

    @property
    def num_classes(self) -> int:
        return CLASSES

    @property
    def class_names(self) -> list[str]:
        return ["top left", "top right", "bottom left", "bottom right"]

    @property
    def canvas_shape(self) -> tuple[int, int, int]:
        return (SIDE, SIDE, 1)

    def __len__(self) -> int:
        return ITEMS

    def sample(
        self, rngs: Sequence[np.random.Generator], indices: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        wanted = list(indices) if indices is not None else [None] * len(rngs)
        used = np.array([int(rng.integers(ITEMS)) if i is None else i for rng, i in zip(rngs, wanted)])
        canvases = torch.zeros(len(used), SIDE, SIDE, 1, dtype=torch.uint8)
        for row, i in enumerate(used):
            y, x = self.corners[i]
            canvases[row, y : y + 8, x : x + 8] = 255
        return canvases.to(self.device), torch.as_tensor(self.labels[used]).to(self.device), used

    def to(self, device: str | torch.device) -> QuadrantCanvas:
        self.device = torch.device(device)
        return self


def build_quadrants(split: str | None, root: Any, image_size: tuple[int, int], device: Any, **_: Any) -> CanvasSource:
    if image_size != (SIDE, SIDE):
        raise ValueError(f"quadrant canvases are {SIDE}x{SIDE}, got image_size={image_size}")
    return QuadrantCanvas(split, device)


register_dataset(
    DatasetSpec(
        name="toy-quadrants",
        build=build_quadrants,
        env_id="AVE-ToyQuadrants-v0",
        image_size=SIDE,
        patch=8,
        glimpse=1,
        budget=4,
        env_split="train",
        eval_split="test",
        model="vit_tiny_patch16_224",
        train_model=dict(in_chans=1, depth=2, embed_dim=32, num_heads=2, mean=(0.1,), std=(0.3,)),
        lr=1e-3,
        flip=False,
        description="a bright square in one of four quadrants",
    )
)


@register_agent("toy-raster")
class RasterAgent(GlimpseAgent):
    """Looks at the allowed positions in reading order."""

    def act(self, obs: dict[str, np.ndarray], action_mask: np.ndarray) -> np.ndarray:
        return np.asarray(action_mask, dtype=bool).argmax(axis=1).astype(np.int64)


@register_reward("toy-confidence")
def confidence_gain(before: Belief, after: Belief) -> torch.Tensor:
    """The rise of the top class's probability."""
    return after.probs.max(-1).values - before.probs.max(-1).values


TINY_MODEL = dict(model_kwargs=dict(depth=2, embed_dim=32, num_heads=2), pretrained=False)


def test_the_registries_know_the_toys() -> None:
    assert "toy-quadrants" in avex.DATASETS and "toy-raster" in avex.AGENTS and "toy-confidence" in avex.REWARDS
    assert gym.spec("AVE-ToyQuadrants-v0").kwargs["budget"] == 4


def test_env_runs_the_toy_reward() -> None:
    env = gym.make("AVE-ToyQuadrants-v0", reward="toy-confidence", **TINY_MODEL)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs["canvas"].shape == (SIDE, SIDE, 1) and env.action_space.n == 16  # a 4x4 grid of 1-patch glimpses
    probs = obs["probs"]
    obs, reward, *_ = env.step(5)
    assert reward == pytest.approx(float(obs["probs"].max() - probs.max()), abs=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier trained for two steps on the toy data set by `avex train classifier`."""
    out = tmp_path_factory.mktemp("toy") / "tore"
    argv = ["train", "classifier", "--dataset", "toy-quadrants", "--steps", "2", "--batch-size", "8"]
    argv += ["--eval-size", "8", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return out.with_suffix(".safetensors")


def test_training_step_and_benchmark(trained: Path, tmp_path: Path) -> None:
    assert (
        trained.exists() and json.loads(trained.with_suffix(".json").read_text())["meta"]["dataset"] == "toy-quadrants"
    )
    out = tmp_path / "bench"
    argv = ["benchmark", "--env", "AVE-ToyQuadrants-v0", "--agents", "toy-raster", "random", "--K", "0"]
    argv += ["--episodes", "4", "--num-envs", "4", "--env-kwargs", json.dumps({"checkpoint": str(trained)})]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads((out / "benchmark.json").read_text())["results"]
    assert [r["agent"] for r in results] == ["toy-raster", "random"] and len(results[0]["accuracy"]) == 4
