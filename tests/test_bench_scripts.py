"""Benchmark scripts (``benchmarks/``) on tiny inputs on the CPU: they run end to end, and what they measure moves."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image
from script_kit import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def train_folder_speed() -> ModuleType:
    return load_benchmark("train_folder_speed")


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/train/{a,b}/*.jpg``: three small JPEGs per class, written with PIL."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def _run(module: ModuleType, root: Path, out: Path, *flags: str) -> dict[str, Any]:
    argv = ["--root", str(root), "--split", "train", "--dataset", "folder", "--device", "cpu"]
    argv += ["--model", "vit_tiny_patch16_224", "--batch-size", "2", "--warmup", "1", "--steps", "2", "--out", str(out)]
    assert module.main([*argv, *flags]) == 0
    return json.loads(out.with_suffix(".json").read_text())


def test_train_folder_speed_every_variant(train_folder_speed: ModuleType, jpeg_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "speed.md"
    report = _run(train_folder_speed, jpeg_folder, out, "--img-size", "128")  # 8x8 patches: TORE's 12 glimpses fit
    rows = {r["variant"]: r for r in report["rows"]}
    assert report["meta"]["failed"] == [] and list(rows) == ["plain", "tore", "trainer"]
    for r in rows.values():
        assert r["batch"] == 2 and r["images_per_s"] > 0 and math.isfinite(r["last_loss"])
        assert 0 <= r["loader_idle"] < 0.5  # two tiny JPEGs read ahead on threads: never most of a step
    assert rows["tore"]["step"] == rows["trainer"]["step"] == "eager"  # the CPU runs the eager step
    # The trainer's run follows Training.step's draws: the same last loss after the same steps.
    assert rows["trainer"]["last_loss"] == pytest.approx(rows["tore"]["last_loss"], rel=1e-5)
    assert rows["trainer"]["interval_img_s"] and Path(rows["trainer"]["log"]).is_file()
    text = out.read_text()
    assert "| TORE (Training.step) | eager | 2 |" in text and "| 1.00x |" in text
    assert "decoding JPEGs" in report["meta"]["data"]
    assert "avex train classifier --dataset folder" in report["meta"]["trainer_command"]


def test_loader_idle_sees_a_slow_loader(
    train_folder_speed: ModuleType, jpeg_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that takes 0.3 s to read, on the training thread (no read-ahead), is most of the step."""
    from avex.data.folder import ImageFolderCanvas

    read = ImageFolderCanvas.random_batch

    def slow(self: ImageFolderCanvas, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(ImageFolderCanvas, "random_batch", slow)
    report = _run(train_folder_speed, jpeg_folder, tmp_path / "slow.md", "--img-size", "32", "--workers", "0",
                  "--variants", "plain")  # fmt: skip
    (row,) = report["rows"]
    assert row["host_loader_ms"] >= 300 and row["loader_idle"] > 0.5


def test_train_folder_speed_refuses_bad_counts(train_folder_speed: ModuleType, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        train_folder_speed.parse_args(["--root", "x", "--steps", "0"])
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err
