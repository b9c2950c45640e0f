"""The vector-step profile (``benchmarks/profile_step.py env``) and the side-by-side timer (``benchmarks/ab_step.py``)
on the CPU: the trace is attributed to the right step, the table is written, two trees are timed in turn."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from script_kit import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"checkpoint": None, "model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 1}}


@pytest.fixture(scope="module")
def profile_step() -> ModuleType:
    return load_benchmark("profile_step")


def event(name: str, cat: str, ts: float, dur: float, corr: int | None = None, **args: float) -> dict:
    """One complete Chrome-trace event, with the launch correlation id torch.profiler gives."""
    if corr is not None:
        args["correlation"] = corr
    return dict(ph="X", name=name, cat=cat, ts=ts, dur=dur, args=args)


def test_trace_events_go_to_the_step_that_launched_them(profile_step: ModuleType) -> None:
    """A kernel that runs after its step's host span still counts for that step (by its launch's correlation)."""
    events = [
        event("vector step 00", "user_annotation", 0, 1000),
        event("vector step 01", "user_annotation", 1000, 1000),
        event("vector step 01", "gpu_user_annotation", 2400, 400),  # the range on the GPU's timeline: not a step
        event("cudaLaunchKernel", "cuda_runtime", 10, 5, 1),
        event("cudaMemcpyAsync", "cuda_runtime", 20, 5, 2),
        event("cudaStreamSynchronize", "cuda_runtime", 30, 300, 3),
        event("cudaLaunchKernel", "cuda_runtime", 1010, 5, 4),
        event("gemm", "kernel", 15, 100, 1),
        event("Memcpy HtoD (Pageable -> Device)", "gpu_memcpy", 120, 10, 2, bytes=4e6),
        event("gemm", "kernel", 2500, 200, 4),  # ran after step 01's host span: still step 01's
        event("orphan", "kernel", 3000, 50, 99),  # no launch in a step: left out
    ]
    steps, kernels = profile_step._per_step(events, "vector step ")
    assert len(steps) == 2
    assert steps[0]["syncs"] == 1 and steps[0]["sync_ms"] == pytest.approx(0.3)
    assert steps[0]["h2d"] == 1 and steps[0]["pageable"] == 1 and steps[0]["h2d_mb"] == pytest.approx(4)
    assert steps[0]["kernels"] == 1 and steps[1]["kernels"] == 1 and steps[1]["kernel_ms"] == pytest.approx(0.2)
    assert "syncs" not in steps[1] and kernels == {"gemm": [2.0, pytest.approx(0.3)]}
    assert profile_step._mean(steps)["kernels"] == 1


def test_env_profile_writes_its_table(profile_step: ModuleType, fake_fmnist_root: Path, tmp_path: Path) -> None:
    args = argparse.Namespace(
        env="AVE-FashionMNIST-v0",
        num_envs=3,
        device="cpu",
        rows=4,
        fake_imagenet=0,
        env_kwargs=json.dumps(dict(TINY, root=str(fake_fmnist_root), budget=3)),
        json=str(tmp_path / "profile.jsonl"),
    )
    args.env_kwargs_raw = json.loads(args.env_kwargs)
    table = profile_step.profile_env(args)
    assert "| one vector step (torch.profiler) | plain (mean of 2) | with autoreset |" in table
    assert "| host time of `step()`, ms |" in table and "ms per vector step" in table
    (report,) = [json.loads(line) for line in (tmp_path / "profile.jsonl").read_text().splitlines()]
    assert report["plain_step"]["host_ms"] > 0 and report["autoreset_step"]["host_ms"] > 0
    assert Path(report["tree"]) == ROOT and report["syncs_per_episode"] == 0  # the CPU never waits


def test_tore_profile_by_shape_takes_the_kernels_rule_of_a_graph(
    profile_step: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``profile_step.py tore --shapes``: a row per op and input shapes (the blocks' products on [B, P + G, D]), the
    layer norm's row rule lifted for the episode only; refused with ``--graph``, whose replay records no shapes."""
    import avex.layer_norm

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling tore_speed, as when run as a script
    args = argparse.Namespace(
        model="vit_tiny_patch16_224", device="cpu", dtype="fp32", decoder="entropy", K=3, batch=2, glimpses=2, rows=60
    )
    seen = []
    run = profile_step._profile_tore
    profile_step._profile_tore = lambda a: seen.append(avex.layer_norm.MIN_ROWS) or run(a)
    try:
        table = profile_step.profile_tore(argparse.Namespace(**vars(args), graph=False, shapes=True))
    finally:
        profile_step._profile_tore = run
    assert seen == [1] and avex.layer_norm.MIN_ROWS == 2048
    assert "Input Shapes" in table and "[[2, 5, 192], [576, 192], [576]]" in table  # a block's qkv product
    with pytest.raises(SystemExit, match="--shapes profiles the eager step"):
        profile_step.profile_tore(argparse.Namespace(**vars(args), graph=True, shapes=True))


def test_ab_step_times_two_trees_in_turn(fake_fmnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ab.md"
    kwargs = json.dumps(dict(TINY, root=str(fake_fmnist_root), budget=3))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ab_step.py"), "--before", str(ROOT), "--rounds", "2"]
    cmd += ["--steps", "4", "--threads", "1", "--env-kwargs", kwargs, "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    text = out.read_text()
    assert "| before (" in text and "| after (" in text and "after / before, median step:" in text
