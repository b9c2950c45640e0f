"""The avex command line: benchmark and demo end to end on a tiny model (the main job's code path)."""

from __future__ import annotations

import json

import pytest

from avex.cli import build_parser, main

TINY = '{"checkpoint": null, "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "root": "%s"}'


def test_benchmark_writes_tables_and_plots(tmp_path, fake_fmnist_root) -> None:
    out = tmp_path / "bench"
    main(["benchmark", "--agents", "random", "entropy", "--K", "0", "2", "--episodes", "8", "--num-envs", "4",
          "--env-kwargs", TINY % fake_fmnist_root, "--out", str(out)])
    report = (out / "benchmark.md").read_text()
    data = json.loads((out / "benchmark.json").read_text())
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "flops.png").stat().st_size > 1000
    assert len(data["results"]) == 4 and "| entropy | 2 |" in report
    for r in data["results"]:
        assert len(r["accuracy"]) == 12 and all(lo <= a <= hi for a, lo, hi in zip(r["accuracy"], r["ci_low"], r["ci_high"]))
    by_k = {r["K"]: r for r in data["results"] if r["agent"] == "random"}
    assert by_k[0]["flop_ratio"] == pytest.approx(1.0) and by_k[2]["flop_ratio"] > 1.0  # K=2 saves compute


def test_demo_writes_gif(tmp_path, fake_fmnist_root) -> None:
    gif = tmp_path / "demo.gif"
    main(["demo", "--agent", "random", "--env-kwargs", TINY % fake_fmnist_root, "--gif", str(gif)])
    from PIL import Image

    assert Image.open(gif).n_frames == 13  # the reset frame and one per glimpse


def test_unknown_subcommand_is_rejected() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fly"])
