"""The avex command line: benchmark and demo end to end on a tiny model (the main job's code path)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from avex.cli import build_parser, main

TINY = '{"checkpoint": null, "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "root": "%s"}'


def test_benchmark_writes_tables_and_plots(tmp_path, fake_fmnist_root) -> None:
    out = tmp_path / "bench"
    assert (
        main(
            [
                "benchmark",
                "--agents",
                "random",
                "entropy",
                "--K",
                "0",
                "2",
                "--episodes",
                "8",
                "--num-envs",
                "4",
                "--env-kwargs",
                TINY % fake_fmnist_root,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = (out / "benchmark.md").read_text()
    data = json.loads((out / "benchmark.json").read_text())
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "flops.png").stat().st_size > 1000
    assert len(data["results"]) == 4 and "| entropy | 2 |" in report
    for r in data["results"]:
        assert len(r["accuracy"]) == 12 and all(
            lo <= a <= hi for a, lo, hi in zip(r["accuracy"], r["ci_low"], r["ci_high"])
        )
        # 8 episodes per row: each accuracy is a count of 8, its interval Wilson's for n = 8 (z = 1.96).
        p = np.array(r["accuracy"])
        np.testing.assert_allclose(p * 8, np.round(p * 8), atol=1e-9)
        centre, half = (p + 1.96**2 / 16) / (1 + 1.96**2 / 8), 1.96 * np.sqrt(p * (1 - p) / 8 + 1.96**2 / 256)
        np.testing.assert_allclose(r["ci_low"], np.clip(centre - half / (1 + 1.96**2 / 8), 0, 1), atol=1e-9)
        np.testing.assert_allclose(r["ci_high"], np.clip(centre + half / (1 + 1.96**2 / 8), 0, 1), atol=1e-9)
        # The report's per-glimpse table shows the same accuracies, in glimpse order.
        row = f"| {r['agent']} | {r['K']} | " + " | ".join(f"{100 * a:.1f}" for a in r["accuracy"]) + " |"
        assert row in report.splitlines(), row
    by_k = {r["K"]: r for r in data["results"] if r["agent"] == "random"}
    assert by_k[0]["flop_ratio"] == pytest.approx(1.0) and by_k[2]["flop_ratio"] > 1.0  # K=2 saves compute


def test_demo_writes_gif(tmp_path, fake_fmnist_root) -> None:
    gif = tmp_path / "demo.gif"
    assert main(["demo", "--agent", "random", "--env-kwargs", TINY % fake_fmnist_root, "--gif", str(gif)]) == 0
    from PIL import Image

    assert Image.open(gif).n_frames == 13  # the reset frame and one per glimpse


def test_unknown_subcommand_is_rejected() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fly"])


def test_bad_values_end_with_one_line_and_status_2(tmp_path, fake_fmnist_root, capsys, monkeypatch) -> None:
    monkeypatch.delenv("AVEX_TRACEBACK", raising=False)
    args = [
        "benchmark",
        "--agents",
        "random",
        "--K",
        "7",
        "--episodes",
        "2",
        "--num-envs",
        "2",
        "--env-kwargs",
        TINY % fake_fmnist_root,
        "--out",
        str(tmp_path / "bench"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err  # refused once the probe env knows the depth, before any folder is made
    assert err.rstrip().splitlines()[-1].endswith("error: --K must be an integer in 0..2 (the model's depth), got 7")
    assert "Traceback" not in err and not (tmp_path / "bench").exists()
    assert main(["train", "classifier", "--data-root", str(tmp_path / "nowhere"), "--steps", "1"]) == 2
    err = capsys.readouterr().err  # a missing data set: the message lists the ways to install it
    assert any(line.startswith("avex train classifier: error: ") for line in err.splitlines()) and "apt-get" in err
    monkeypatch.setenv("AVEX_TRACEBACK", "1")  # the whole traceback on request
    with pytest.raises(ValueError, match="0..2"):
        main(args)


# Refusals that avex benchmark and avex demo give alike (the same checks: avex.checks.check_int,
# envs.registration.check_env_id, agents.ppo.policy_file).
SHARED_REFUSALS = [
    ("--seed", "-1", "--seed must be an integer >= 0, got -1"),
    ("--env", "CartPole-v1", "--env must be an avex environment, one of ['AVE-FashionMNIST-v0'"),
    ("--ppo", "/nonexistent/policy.safetensors", "--ppo '/nonexistent/policy.safetensors': no policy file"),
    ("--ppo", "shipped:nope", "--ppo 'shipped:nope': no shipped PPO policy named 'nope'"),
]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        *SHARED_REFUSALS,
        ("--episodes", "0", "--episodes must be an integer >= 1, got 0"),
        ("--num-envs", "0", "--num-envs must be an integer >= 1, got 0"),
        ("--K", "-1", "--K must be an integer >= 0, got -1"),
        ("--device", "gpu", "--device must be 'cpu', 'cuda' or 'cuda:<index>', got 'gpu'"),
        # the kwargs the benchmark sets itself (were Python's TypeError "got multiple values")
        ("--env-kwargs", '{"K": 3}', "--env-kwargs sets K=3: pass it as --K"),
        ("--env-kwargs", '{"split": "train"}', "--env-kwargs sets split='train': pass it as --split"),
        ("--env-kwargs", '{"device": "cpu"}', "--env-kwargs sets device='cpu': pass it as --device"),
        ("--env-kwargs", '{"num_envs": 4}', "--env-kwargs sets num_envs=4: pass it as --num-envs"),
        # Gymnasium's episode cap, which gym.make takes (was a RuntimeError: episodes cut short of the budget)
        ("--env-kwargs", '{"max_episode_steps": 3}', "--env-kwargs sets max_episode_steps=3: leave it out"),
    ],
)
def test_bad_benchmark_arguments_are_refused_before_anything_is_made(
    tmp_path, capsys, monkeypatch, flag, value, message
) -> None:
    import gymnasium as gym

    monkeypatch.delenv("AVEX_TRACEBACK", raising=False)
    monkeypatch.setattr(gym, "make", lambda *a, **k: pytest.fail("an env was built"))
    out = tmp_path / "bench"
    assert main(["benchmark", "--agents", "random", flag, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"avex benchmark: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()  # the results folder is made only once every argument passed


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_benchmark_on_cuda_without_cuda_is_refused_before_anything_is_made(tmp_path, capsys, monkeypatch) -> None:
    import gymnasium as gym

    monkeypatch.setattr(gym, "make", lambda *a, **k: pytest.fail("an env was built"))
    assert main(["benchmark", "--device", "cuda", "--out", str(tmp_path / "bench")]) == 2
    assert "--device='cuda' but CUDA is not available here" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_benchmark_out_under_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    import gymnasium as gym

    monkeypatch.setattr(gym, "make", lambda *a, **k: pytest.fail("an env was built"))
    (tmp_path / "notes").write_text("a file, not a folder")
    out = tmp_path / "notes" / "bench"
    assert main(["benchmark", "--agents", "random", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out '{out}': '{tmp_path / 'notes'}' exists and is not a folder" in err
    assert (tmp_path / "notes").read_text() == "a file, not a folder"


def test_unknown_env_id_is_one_line_and_status_2(capsys) -> None:
    assert main(["benchmark", "--env", "AVE-Nope-v0", "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avex benchmark: error:") and "AVE-Nope" in err and err.count("\n") == 1


def test_a_policy_that_does_not_fit_fails_before_any_episode(tmp_path, fake_fmnist_root, capsys, monkeypatch) -> None:
    import avex.cli.benchmark as bench

    played: list[str] = []
    monkeypatch.setattr(bench, "play_episodes", lambda *a, **k: played.append("episodes"))
    out = tmp_path / "bench"
    argv = ["benchmark", "--agents", "random", "ppo", "--K", "0", "--episodes", "4", "--num-envs", "4"]
    # The shipped policy reads a 192-wide CLS embedding; this tiny model's is 32 wide.
    assert main([*argv, "--env-kwargs", TINY % fake_fmnist_root, "--out", str(out)]) == 2
    assert "does not fit" in capsys.readouterr().err and played == [] and not (out / "benchmark.json").exists()


def test_every_benchmark_option_has_help_and_a_shown_default() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["benchmark"]  # type: ignore[union-attr]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help and "(default: " in action.help, action.option_strings


def test_the_reported_command_line_gives_the_same_benchmark() -> None:
    """The report's command (avex.cli.benchmark._argv, flags spelled by avex.options.flag) parses back to the config."""
    import shlex

    from avex import options
    from avex.cli.benchmark import BenchmarkConfig, _argv

    cfg = BenchmarkConfig(agents=("random",), K=(0, 2), env_kwargs={"root": "a b"}, split="test", num_envs=3)
    argv = shlex.split(" ".join(_argv(cfg)))
    assert "--K" in argv and "--num-envs" in argv
    assert options.from_args(BenchmarkConfig, build_parser().parse_args(["benchmark", *argv])) == cfg


def test_unknown_agent_is_refused_before_anything_is_built(capsys, monkeypatch) -> None:
    import gymnasium as gym

    monkeypatch.setattr(gym, "make", lambda *a, **k: pytest.fail("an env was built"))
    assert main(["benchmark", "--agents", "nope", "--episodes", "1"]) == 2
    assert "unknown agent 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--agents", "random", "random"], "--agents names ['random'] more than once, got ['random', 'random']"),
        (["--agents", "random", "--K", "0", "3", "0"], "--K names [0] more than once, got [0, 3, 0]"),
    ],
)
def test_repeated_rows_are_refused_before_anything_is_built(argv, message, capsys, monkeypatch) -> None:
    import gymnasium as gym

    monkeypatch.delenv("AVEX_TRACEBACK", raising=False)
    monkeypatch.setattr(gym, "make", lambda *a, **k: pytest.fail("an env was built"))
    assert main(["benchmark", *argv, "--episodes", "1"]) == 2
    assert message in capsys.readouterr().err


def test_heavy_agents_are_left_out_of_the_cpu_default_only() -> None:
    from avex.cli.benchmark import default_agents

    assert "lookahead" not in default_agents("cpu") and {"random", "entropy", "ppo"} <= set(default_agents("cpu"))
    assert "lookahead" in default_agents("cuda")  # a name check only: no device is touched


@pytest.mark.parametrize(
    "flag, value, message",
    [
        *SHARED_REFUSALS,
        ("--env-kwargs", '{"split": "train"}', "--env-kwargs sets split='train': pass it as --split"),
        ("--env-kwargs", '{"render_mode": "human"}', "--env-kwargs sets render_mode='human': leave it out"),
        ("--gif", "GIF_DIR/demo.png", "--gif must be a path ending in .gif, such as 'results/demo.gif', got '"),
        ("--gif", "GIF_DIR/notes/demo.gif", "--gif 'GIF_DIR/notes/demo.gif': 'GIF_DIR/notes' exists and is not a"),
        ("--gif", "GIF_DIR/folder.gif", "--gif 'GIF_DIR/folder.gif' is a folder; give a file path such as"),
    ],
)
def test_bad_demo_arguments_are_refused_before_anything_is_made(
    tmp_path, capsys, monkeypatch, flag, value, message
) -> None:
    """One line naming the flag and the value, before any env is built or file written (they were tracebacks,
    messages without the flag, or refusals after the episode was played)."""
    import gymnasium as gym

    monkeypatch.delenv("AVEX_TRACEBACK", raising=False)
    monkeypatch.setattr(gym, "make", lambda *a, **k: pytest.fail("an env was built"))
    (tmp_path / "notes").write_text("a file, not a folder")
    (tmp_path / "folder.gif").mkdir()
    before = sorted(tmp_path.rglob("*"))
    argv = ["demo", "--agent", "random", "--gif", str(tmp_path / "out" / "demo.gif")]
    value, message = (s.replace("GIF_DIR", str(tmp_path)) for s in (value, message))
    assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"avex demo: error: {message}") and err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "notes").read_text() == "a file, not a folder"


@pytest.mark.parametrize("command", [["benchmark"], ["demo"], ["train", "ppo"]])
@pytest.mark.parametrize(
    "value, message",
    [
        ("{bad", "not valid JSON (Expecting property name"),
        ("[1]", "expected a JSON object such as '{\"K\": 3}', got '[1]'"),
    ],
)
def test_env_kwargs_that_are_no_json_object_are_refused_by_the_parser(capsys, command, value, message) -> None:
    """Every command reads --env-kwargs with one parser (avex.options' JSON-object type): one message, naming the
    flag, before anything is built."""
    with pytest.raises(SystemExit) as exited:
        main([*command, "--env-kwargs", value])
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert exited.value.code == 2 and last.startswith(
        f"avex {' '.join(command)}: error: argument --env-kwargs: {message}"
    )


def test_bad_ppo_arguments_end_with_one_line_and_status_2(tmp_path, capsys, monkeypatch) -> None:
    """``avex train ppo``: a refusal names the flag as typed, before any env is built or the output folder made."""
    import gymnasium as gym

    monkeypatch.delenv("AVEX_TRACEBACK", raising=False)
    monkeypatch.setattr(gym, "make_vec", lambda *a, **k: pytest.fail("an env was built"))
    out = tmp_path / "runs" / "policy"
    for args, message in [
        (["--batch-size", "1"], "--batch-size must be an integer >= 2"),
        (["--gamma", "nan"], "--gamma must be a number in [0, 1] (a discount), got nan"),
        (["--num-envs", "4"], "--batch-size 1024 is more than a rollout holds (--n-steps 48 x --num-envs 4 = 192)"),
        (["--init", str(tmp_path / "nope.safetensors")], f"--init '{tmp_path / 'nope.safetensors'}': no policy file"),
    ]:
        assert main(["train", "ppo", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"avex train ppo: error: {message}") and err.count("\n") == 1, err
        assert list(tmp_path.iterdir()) == []


def test_ppo_out_none_writes_no_file(tmp_path, fake_fmnist_root, capsys, monkeypatch) -> None:
    """The help's "(none: no file)": ``--out none`` used to write ./none.safetensors and ./none.json."""
    monkeypatch.chdir(tmp_path)
    run = ["--num-envs", "2", "--total-steps", "48", "--n-steps", "24", "--batch-size", "16", "--n-epochs", "1"]
    argv = ["train", "ppo", *run, "--eval-episodes", "2", "--env-kwargs", TINY % fake_fmnist_root, "--out", "none"]
    assert main(argv) == 0
    assert "no file written (--out none)" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
