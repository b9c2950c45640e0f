"""``avex benchmark``: glimpse policies x split points on an environment's evaluation split.

For every agent and K it plays episodes on the batched vector env and reports accuracy after each
glimpse (with 95% Wilson intervals), analytic FLOPs per episode of TORE against full recomputation
(K=0), and wall time per step; it prints a Markdown table and writes it, a JSON file and two PNG plots
(accuracy vs glimpses per agent; cumulative FLOPs vs glimpses per K) to the results folder.
Agents see the same canvases (the envs are seeded alike for every run), so differences are paired.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from agents import AGENTS, make_agent, play_episodes
from agents.evaluate import evaluation_split, wilson
from agents.ppo import policy_file
from avex import options
from avex.checks import check_device, check_int, check_writable
from avex.flops import ViTDims, episode_flops
from avex.platform_info import device_name
from envs.registration import check_env_id, check_env_kwargs

if TYPE_CHECKING:
    from envs.ave_env import AVEEnv
    from envs.vector import AVEVectorEnv

__all__ = ["BenchmarkConfig", "add_arguments", "default_agents", "main_from_args", "run_benchmark"]


WHAT, HOW = "what to compare", "how to run it"

# env kwargs the benchmark refuses, with what to do instead: those it sets itself (gym.make / gym.make_vec), and
# Gymnasium's episode cap, which gym.make takes for itself and which would cut episodes the table needs whole.
_OWN_ENV_KWARGS = {
    "K": "pass it as --K",
    "split": "pass it as --split",
    "device": "pass it as --device",
    "num_envs": "pass it as --num-envs",
    "max_episode_steps": "leave it out: an episode is the glimpse budget (set 'budget' to change it)",
}


@dataclass
class BenchmarkConfig:
    """One benchmark: agents x split points on an env's evaluation split; one flag per field."""

    env: str = options.option("AVE-FashionMNIST-v0", WHAT, "environment id")
    agents: tuple[str, ...] | None = options.option(
        None,
        WHAT,
        "registered agents to compare",
        nargs="+",
        metavar="AGENT",
        default_text="every registered agent; on a CPU, those that are not heavy (lookahead runs on a GPU)",
    )
    K: tuple[int, ...] | None = options.option(
        None, WHAT, "split points", nargs="+", flag="--K", default_text="0, depth // 2 and depth"
    )
    ppo: str = options.option(
        "shipped:fashion-mnist",
        WHAT,
        "policy of the ppo agent: avex's .safetensors, or a MaskablePPO / PPO .zip saved by model.save()",
    )
    env_kwargs: dict[str, Any] = options.option(
        {},
        WHAT,
        'extra env kwargs as a JSON object, e.g. \'{"root": "data"}\'; not '
        + ", ".join(_OWN_ENV_KWARGS)
        + " (its refusal says what to do instead)",
    )
    split: str | None = options.option(
        None, WHAT, "split the episodes come from", default_text="the data set's evaluation split"
    )
    episodes: int = options.option(500, HOW, "episodes per agent and K")
    num_envs: int = options.option(250, HOW, "envs stepped together (one batched TORE forward)")
    device: str = options.option("cpu", HOW, "torch device of the envs and agents (cpu, cuda, cuda:<i>)")
    seed: int = options.option(0, HOW, "seed of the envs and the agents: every agent sees the same canvases")
    out: str | None = options.option(None, HOW, "results folder", default_text="results/benchmark-<env>")


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, BenchmarkConfig)


def default_agents(device: str) -> tuple[str, ...]:
    """Every registered agent; on a CPU, those that are not ``heavy`` (one model step per candidate)."""
    on_cpu = torch.device(device).type == "cpu"
    return tuple(name for name in AGENTS.names() if not (on_cpu and AGENTS.get(name).heavy))


def _play(
    env_id: str, agent_name: str, K: int, args: BenchmarkConfig, env_kwargs: dict[str, Any], bar
) -> dict[str, Any]:
    """Play ``args.episodes`` episodes of one agent at one K; return per-step correctness and timings."""
    n = min(args.num_envs, args.episodes)
    venv = gym.make_vec(env_id, num_envs=n, split=args.split, K=K, device=args.device, **env_kwargs)
    agent = make_agent(agent_name, venv.unwrapped, seed=args.seed, policy=args.ppo, device=args.device)
    stats = play_episodes(venv, agent, args.episodes, args.seed, on_round=bar.update)
    venv.close()
    return dict(
        correct=stats.correct,
        episode_flops=stats.episode_flops,
        ms_per_step=stats.ms_per_step,
        agent_ms_per_step=stats.agent_ms_per_step,
        num_envs=n,
        budget=cast("AVEVectorEnv", venv.unwrapped).budget,
    )


def _result(agent: str, K: int, played: dict[str, Any], dims: ViTDims, budget: int, g2: int) -> dict[str, Any]:
    """One table row: accuracy after each glimpse with Wilson intervals, and FLOPs against full recomputation."""
    acc, lo, hi = wilson(played.pop("correct").astype(np.float64))
    full = episode_flops(dims, budget, g2, 0, recon=False)[-1]  # the env runs the entropy map only
    # The decoder (entropy map) costs the same at every K; the classifier alone shows TORE's saving.
    classifier = episode_flops(dims, budget, g2, K, decoder=False)[-1]
    return dict(
        agent=agent,
        K=K,
        accuracy=acc.tolist(),
        ci_low=lo.tolist(),
        ci_high=hi.tolist(),
        full_recompute_flops=full,
        flop_ratio=full / played["episode_flops"],
        classifier_flops=classifier,
        classifier_flop_ratio=episode_flops(dims, budget, g2, 0, decoder=False)[-1] / classifier,
        **played,
    )


def _check_args(args: BenchmarkConfig) -> Path:
    """Every argument that can be checked without building anything, so a refusal changes nothing; returns the
    results folder (not made yet)."""
    check_env_id(args.env, "--env")
    check_env_kwargs(args.env_kwargs, _OWN_ENV_KWARGS)
    check_device("--device", args.device)
    check_int("--episodes", args.episodes, 1)
    check_int("--num-envs", args.num_envs, 1)
    check_int("--seed", args.seed, 0)
    for K in args.K or ():  # the upper bound, the model's depth, is checked once the probe env has it
        check_int("--K", K, 0)
    if args.K is not None and not args.K:
        raise ValueError("--K needs at least one split point, got none")
    if args.agents is not None and not args.agents:
        raise ValueError("--agents needs at least one agent, got none")
    for name in args.agents or ():  # an unknown name is refused before anything is built
        AGENTS.get(name)
    for flag, values in (("--K", args.K or ()), ("--agents", [AGENTS.canonical(n) for n in args.agents or ()])):
        twice = sorted({v for v in values if list(values).count(v) > 1})
        if twice:  # each value is a row of the table: a repeat ran the same episodes again
            raise ValueError(f"{flag} names {twice} more than once, got {list(values)}: name each once")
    policy_file(args.ppo, "--ppo")
    return check_writable("--out", args.out or f"results/benchmark-{args.env}", folder=True)


def run_benchmark(args: BenchmarkConfig) -> dict[str, Any]:
    """Run every (agent, K); write and return the results.

    Raises:
        ValueError, FileNotFoundError: a bad argument (named with its value), before the results folder is made.
    """
    out = _check_args(args)
    env_kwargs = dict(args.env_kwargs)
    if args.split is None:
        args.split = evaluation_split(args.env, env_kwargs)
    if args.agents is None:
        args.agents = default_agents(args.device)
    probe = cast("AVEEnv", gym.make(args.env, split=args.split, device=args.device, **env_kwargs).unwrapped)
    depth, budget, g2 = probe.model.depth, probe.budget, probe.geometry.tokens_per_glimpse
    dims = ViTDims.of(probe.model)
    ks = args.K if args.K is not None else probe.model.report_ks
    probe.close()
    for K in ks:
        check_int("--K", K, 0, depth, " (the model's depth)")
    for name in args.agents:  # every agent is built once before any episode: a policy that does not fit fails now
        make_agent(name, probe, seed=args.seed, policy=args.ppo, device=args.device)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused argument leaves no empty results folder behind
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tqdm(total=len(args.agents) * len(ks) * args.episodes, desc="benchmark", unit="ep", dynamic_ncols=True) as bar:
        for agent in args.agents:
            for K in ks:
                bar.set_postfix(agent=agent, K=K)
                results.append(_result(agent, K, _play(args.env, agent, K, args, env_kwargs, bar), dims, budget, g2))
    meta = dict(
        command="avex benchmark " + " ".join(_argv(args)),
        env=args.env,
        split=args.split,
        episodes=args.episodes,
        device=device_name(args.device),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        seconds=round(time.perf_counter() - started, 1),
        depth=depth,
        budget=budget,
        cumulative_flops={K: episode_flops(dims, budget, g2, K, recon=False) for K in ks},
    )
    report = _markdown(results, meta)
    (out / "benchmark.md").write_text(report)
    (out / "benchmark.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    _plots(results, meta, out)
    print(report)
    print(f"results written to {out}/ (benchmark.md, benchmark.json, accuracy.png, flops.png)")
    return dict(meta=meta, results=results)


def _argv(args: BenchmarkConfig) -> list[str]:
    """The flags that give ``args`` again (for the report's command line)."""
    parts = []
    for k, v in asdict(args).items():
        if v is None:
            continue
        flag = options.flag(BenchmarkConfig, k)
        if isinstance(v, dict):
            parts += [flag, shlex.quote(json.dumps(v))]
        else:
            parts += [flag, *map(str, v)] if isinstance(v, (list, tuple)) else [flag, str(v)]
    return parts


def _markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    budget = meta["budget"]
    marks = sorted({1, min(4, budget), min(8, budget), budget})
    lines = [
        f"# avex benchmark: {meta['env']} ({meta['split']} split)",
        "",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']}",
        f"- date: {meta['date']}",
        f"- {meta['episodes']} episodes per row; accuracy with 95% Wilson intervals; "
        "FLOPs = 2 x multiply-accumulates, analytic (avex.flops), per episode incl. the empty pass and the decoder; "
        "full recomputation = K=0.",
        f"- total time: {meta['seconds']} s",
        "",
        f"- time: one batched step of {results[0]['num_envs']} envs (env) "
        "and one batched agent decision (agent), in ms.",
        "",
        "| agent | K | "
        + " | ".join(f"acc@{t}" for t in marks)
        + " | GFLOPs/episode | FLOP saving vs K=0 | classifier-only saving | env ms/step | agent ms/step |",
        "|---|---|" + "---|" * len(marks) + "---|---|---|---|---|",
    ]
    for r in results:
        accs = " | ".join(
            f"{100 * r['accuracy'][t - 1]:.1f} ({100 * r['ci_low'][t - 1]:.1f}-{100 * r['ci_high'][t - 1]:.1f})"
            for t in marks
        )
        lines.append(
            f"| {r['agent']} | {r['K']} | {accs} | {r['episode_flops'] / 1e9:.3f} | {r['flop_ratio']:.2f}x | "
            f"{r['classifier_flop_ratio']:.2f}x | {r['ms_per_step']:.2f} | {r['agent_ms_per_step']:.2f} |"
        )
    lines += [
        "",
        "## Accuracy (%) after each glimpse",
        "",
        "| agent | K | " + " | ".join(str(t) for t in range(1, budget + 1)) + " |",
        "|---|---|" + "---|" * budget,
    ]
    for r in results:
        lines.append(f"| {r['agent']} | {r['K']} | " + " | ".join(f"{100 * a:.1f}" for a in r["accuracy"]) + " |")
    return "\n".join(lines) + "\n"


def _plots(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["K"] for r in results})
    steps = np.arange(1, meta["budget"] + 1)
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), sharey=True, squeeze=False)
    for ax, K in zip(axes[0], ks):
        for r in (r for r in results if r["K"] == K):
            ax.plot(steps, 100 * np.array(r["accuracy"]), marker="o", ms=3, label=r["agent"])
            ax.fill_between(steps, 100 * np.array(r["ci_low"]), 100 * np.array(r["ci_high"]), alpha=0.2)
        ax.set(title=f"K = {K}", xlabel="glimpses", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{meta['env']}: accuracy after each glimpse ({meta['episodes']} episodes, 95% CI)")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for K, cum in meta["cumulative_flops"].items():
        ax.plot(
            np.arange(len(cum)),
            np.array(cum) / 1e9,
            marker="o",
            ms=3,
            label=f"K = {K}" + (" (full recomputation)" if int(K) == 0 else ""),
        )
    ax.set(xlabel="glimpses (0 = empty pass)", ylabel="cumulative GFLOPs", title="TORE compute per episode")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "flops.png", dpi=110)
    plt.close(fig)


def main_from_args(args: argparse.Namespace) -> int:
    run_benchmark(options.from_args(BenchmarkConfig, args))
    return 0
