"""Benchmark scripts (``benchmarks/``) on tiny inputs on the CPU: they run end to end, and what they measure moves."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
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


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_env_kernels_script_under_interpreter(tmp_path: Path) -> None:
    """benchmarks/env_kernels.py end to end on tiny shapes under Triton's interpreter: every table, a sweep whose
    candidates all ran, and a LAUNCHES entry for the decoder's sequence length."""
    out, js = tmp_path / "k.md", tmp_path / "k.json"
    argv = ["layer-norm", "entropy", "--device", "cpu", "--dtype", "fp32", "--calls", "1", "--reps", "1"]
    argv += ["--envs", "2", "--tokens", "5", "--vitb-batch", "1", "--small-rows", "64", "--norm-rows", "16"]
    argv += ["--norm-warps", "4", "--grid", "2", "--batch", "2", "1", "--block-m", "16", "--block-n", "16", "32"]
    argv += ["--warps", "4", "--stages", "1", "--out", str(out), "--json", str(js)]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "benchmarks/env_kernels.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(js.read_text())
    norms = report["layer_norm"]
    assert [tuple(r["shape"]) for r in norms] == [(2, 5, 192), (2, 197, 128), (1, 197, 768), (64, 192)]
    assert all(r["torch_us"] > 0 and r["kernel_us"] > 0 and None not in r["sweep"].values() for r in norms[:3])
    ent = report["entropy"]
    assert ent["seq_len"] == 5 and len(ent["times"]) == 3  # 2 block sizes at the default stages, then 1 stage
    assert all(None not in t["us"] for t in ent["times"])
    assert ent["entry"].startswith("LAUNCHES[(5, 32, torch.float32)] = Launch(16, ")
    assert "## Entropy kernel launch settings" in out.read_text()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_rows_sweep_script_under_interpreter(tmp_path: Path) -> None:
    """benchmarks/rows_sweep.py end to end on tiny shapes under Triton's interpreter: a row per kernel with its
    default among the timed settings, the second stage's table, and a last line that gpu/rows_tune.sh can read back
    as RowLaunch and SUM_LAUNCH values."""
    import ast

    out = tmp_path / "rows.md"
    argv = ["--device", "cpu", "--rows", "300", "--norm-widths", "48", "--sum-widths", "48", "100"]
    argv += ["--tiles", "512", "2048", "--warps", "4", "--per-program", "64", "128", "--sum-tiles", "256,8", "64,32"]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "benchmarks/rows_sweep.py", *argv, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    for kernel in ("layer_norm_backward", "column_sum", "residual_norm_forward", "residual_norm_backward"):
        assert f"| {kernel} | " in table
    assert "| PyTorch: sum(0), then the cast |  |" in table and "| sum_partials | (64, 32) |" in table
    fastest = ast.literal_eval(done.stdout.strip().splitlines()[-1].removeprefix("fastest: "))
    from avex.train.rows import RowLaunch

    assert set(fastest["ROW_LAUNCH"]) == {"layer_norm_backward", "column_sum", "residual_norm_forward",
                                          "residual_norm_backward"}  # fmt: skip
    for setting in fastest["ROW_LAUNCH"].values():
        launch = RowLaunch(*setting)
        assert launch.tile in (512, 2048, 4096, 1024) and launch.num_warps == 4  # the grid's, or a default's
    assert fastest["SUM_LAUNCH"] in [(256, 8), (64, 32)]


def _tore_speed_argv(*flags: str) -> list[str]:
    tiny = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--device", "cpu", "--K", "0", "6"]
    return [*tiny, "--batch", "4", "--repeats", "1", "--warmup", "0", "--decoder", "entropy", *flags]


def test_tore_speed_splits_a_step_over_streams(capsys: pytest.CaptureFixture) -> None:
    """benchmarks/tore_speed.py with its graph episodes emulated on the CPU: a step split in 2 parts (``--streams``)
    passes the same check against ``forward_glimpses`` at every step as the whole batch, with the same logits."""
    tore_speed = load_benchmark("tore_speed")
    runs = {
        n: tore_speed.main(_tore_speed_argv("--mode", "graph", "--emulate-graphs", "--streams", str(n))) for n in (1, 2)
    }
    for n, rows in runs.items():
        assert [(r["K"], r["batch"], r["streams"]) for r in rows] == [(0, 4, n), (6, 4, n)]
        assert all(r["check_rel_err"] < 1e-4 and r["step_ms"] > 0 for r in rows)
    for one, two in zip(runs[1], runs[2]):
        assert two["check_rel_err_by_t"] == pytest.approx(one["check_rel_err_by_t"], abs=1e-5)
    assert "split over 2 concurrent CUDA streams" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--mode", "graph", "--emulate-graphs", "--streams", "3"), "--streams 3 must be at least 1 and divide"),
        (("--mode", "eager", "--streams", "2"), "--streams 2 splits a captured step: use --mode graph"),
        (("--mode", "compile", "--streams", "2"), "--streams 2 splits a captured step: use --mode graph"),
    ],
)
def test_tore_speed_refuses_streams_it_cannot_split(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_benchmark("tore_speed").main(_tore_speed_argv(*flags))
