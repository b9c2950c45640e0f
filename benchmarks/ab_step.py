"""Two source trees timed side by side in one run: the step of one env, alternating between the trees.

Each tree runs in its own worker process (``PYTHONPATH`` = the tree's root, so each imports its own ``avex``,
``envs`` and ``agents``); the driver asks them in turn for rounds of steps, switching which goes first each
round, so both see the same machine load. Only ``env.step`` is timed (the random agent's choice and resets
are not); the first episode of each worker is warm-up.

    git archive <base commit> avex envs agents | tar -x -C /tmp/before      # the tree before a change
    python benchmarks/ab_step.py --before /tmp/before --device cpu --rounds 20 --steps 48 --out ab.md

``--num-envs N`` times the native vector env of N envs (one ``step`` of all N) instead of the single env.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """Build the env, then for each line "n" on stdin time n steps; print their times (ms) as one JSON line."""
    import importlib

    import gymnasium as gym
    import torch

    from avex.platform_info import synchronize

    importlib.import_module("envs")  # registers the ids

    torch.set_num_threads(args.threads)
    kwargs = json.loads(args.env_kwargs)
    rng = np.random.default_rng(0)
    if args.num_envs:
        env = gym.make_vec(args.env, num_envs=args.num_envs, device=args.device, **kwargs)
        n, budget = args.num_envs, env.unwrapped.budget
        plan = np.argsort(rng.random((n, env.unwrapped.geometry.num_actions)), axis=1)[:, :budget]  # no repeats
        env.reset(seed=0)
        counter = [0]

        def one() -> float:
            action = plan[:, counter[0] % budget]
            counter[0] += 1
            t0 = time.perf_counter()
            env.step(action)
            synchronize(args.device)
            return time.perf_counter() - t0

    else:
        env = gym.make(args.env, device=args.device, **kwargs)
        budget = env.unwrapped.budget
        _, info = env.reset(seed=0)
        state = {"info": info, "t": 0}

        def one() -> float:
            if state["t"] == budget:
                _, state["info"] = env.reset()
                state["t"] = 0
            action = int(rng.choice(np.flatnonzero(state["info"]["action_mask"])))
            t0 = time.perf_counter()
            _, _, _, _, state["info"] = env.step(action)
            synchronize(args.device)
            state["t"] += 1
            return time.perf_counter() - t0

    for _ in range(budget):  # warm-up: one episode
        one()
    print("ready", flush=True)
    for line in sys.stdin:
        times = [1e3 * one() for _ in range(int(line))]
        print(json.dumps(times), flush=True)


def _spawn(tree: Path) -> subprocess.Popen[str]:
    """A worker on ``tree``; it says "ready" once warm (:func:`_ready`)."""
    # The tree first: its packages shadow any other avex on the path (an editable install, this tree's root).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *sys.argv[1:]]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tree)


def _ready(proc: subprocess.Popen[str], tree: Path) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"the worker of {tree} did not start (said {line!r}); run it alone to see why")


def _ask(proc: subprocess.Popen[str], steps: int) -> list[float]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{steps}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def _alternate(trees: dict[str, Path], args: argparse.Namespace) -> tuple[dict[str, list[float]], list[dict]]:
    """Step times (ms) per tree, and each round's median per tree: ``args.rounds`` rounds in each of
    ``args.restarts`` pairs of fresh workers (a worker's own placement on the machine biases all its rounds)."""
    times: dict[str, list[float]] = {name: [] for name in trees}
    rounds: list[dict[str, float]] = []
    for _ in range(args.restarts):
        procs = {name: _spawn(tree) for name, tree in trees.items()}  # both start (and warm up) at once
        for name, proc in procs.items():
            _ready(proc, trees[name])
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            medians = {}
            for name in order:
                got = _ask(procs[name], args.steps)
                times[name] += got
                medians[name] = float(np.median(got))
            rounds.append(medians)
        for proc in procs.values():
            proc.communicate("")
    return times, rounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="root of the tree before the change (avex, envs, agents)")
    p.add_argument("--after", default=str(ROOT), help="root of the tree after it (default: this one)")
    p.add_argument("--env", default="AVE-FashionMNIST-v0")
    p.add_argument("--env-kwargs", default="{}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-envs", type=int, default=0, help="time the vector env of this many envs (0: single env)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=48, help="steps per tree and round")
    p.add_argument("--restarts", type=int, default=1, help="pairs of fresh workers, each running all the rounds")
    p.add_argument("--out", default=None, help="append a Markdown section to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from avex.platform_info import device_name

    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    times, rounds = _alternate(trees, args)
    what = f"vector env of {args.num_envs} envs" if args.num_envs else "single env"
    lines = [
        f"### {args.env}, {what}: one step, two trees alternating on {device_name(args.device)}",
        "",
        f"- command: `python benchmarks/ab_step.py {' '.join(sys.argv[1:])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.threads} torch thread(s) per worker; "
        f"{args.restarts} x {args.rounds} rounds of {args.steps} steps per tree (fresh workers for each of the "
        f"{args.restarts}), first tree alternating",
        "",
        "| tree | median ms | mean ms | p90 ms | rounds faster |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in trees:
        ms = np.asarray(times[name])
        wins = sum(m[name] < min(v for k, v in m.items() if k != name) for m in rounds)
        lines.append(
            f"| {name} (`{trees[name]}`) | {np.median(ms):.3f} | {ms.mean():.3f} | {np.percentile(ms, 90):.3f} | "
            f"{wins} of {len(rounds)} |"
        )
    ratio = np.median(times["after"]) / np.median(times["before"])
    pairs = [rounds[i : i + args.rounds] for i in range(0, len(rounds), args.rounds)]
    per_pair = [np.median([m["after"] for m in pair]) / np.median([m["before"] for m in pair]) for pair in pairs]
    lines += ["", f"after / before, median step: {ratio:.3f}; per pair of workers: "]
    lines[-1] += ", ".join(f"{x:.3f}" for x in per_pair)
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
