"""The host's share of a vector env step, measured on the CPU: what a GPU would not take off the host.

On a GPU a vector step costs the host its Python and NumPy work plus a launch per tensor op; the tensor ops
themselves run on the GPU. On the CPU the ops run in line, so this script separates them: under
``torch.profiler`` (CPU only: about a microsecond per op) each op that no other op called is timed, and

    host ms per step = wall ms per step - those ops' ms per step

is the Python and NumPy work (validation, bookkeeping over [num_envs] arrays, per-env loops, layout draws,
stacking, packing) plus the dispatcher's per-op cost, which a GPU step pays too. The least disturbed of
``--repeats`` runs is kept (other processes share the CPU). The env runs a tiny model (one block, 16 wide,
K=1, no decoder) with ``torch_obs=True`` and the observation keys of PPO (no ``canvas``: composing it is one
large tensor op here), so the tensor work is small and the step takes the path it takes on a GPU.
Per function: cProfile's own time in a run where every aten op executes inside a ``TorchDispatchMode``'s
``__torch_dispatch__`` (left out of the table), so no function's own time holds tensor work, not even an op
reached through an operator or indexing; what grows with ``num_envs`` grows from column to column (cProfile's
own overhead is in these figures, not in the totals).

    python benchmarks/host_step.py --num-envs 4096 16384             # this tree
    PYTHONPATH=<other tree> python benchmarks/host_step.py ...       # another tree (only the Gymnasium API)
    python benchmarks/host_step.py --num-envs 4096 --autoreset-mode next_step --numpy-obs

Each size runs ``--episodes`` episodes of every env (one autoreset each) after one of warm-up.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

# One block, 16 wide, split after it (the aggregator runs no block): the model's work is a small part.
TINY = dict(
    checkpoint=None,
    pretrained=False,
    model="vit_tiny_patch16_224",
    model_kwargs=dict(depth=1, embed_dim=16, num_heads=1),
    K=1,
    entropy=False,
    obs_keys=["probs", "cls", "entropy", "visited", "step"],
)
_CLOCK = ("host_step.py", "torch/_ops.py", "torch/utils/_python_dispatch.py")
Site = tuple[str, int, str]  # cProfile's key: (file, first line, function)


class _AtenClock(TorchDispatchMode):
    """Runs every aten op inside :meth:`__torch_dispatch__`, so that cProfile counts ops apart from their callers."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _stepper(args: argparse.Namespace, num_envs: int) -> tuple[Callable[[], None], int]:
    """A vector env of ``num_envs`` envs, reset: a function taking one step of valid non-repeating positions."""
    import gymnasium as gym

    import avex  # noqa: F401  registers the ids

    kwargs = dict(TINY, **json.loads(args.env_kwargs))
    venv = gym.make_vec(
        args.env, num_envs=num_envs, torch_obs=not args.numpy_obs, autoreset_mode=args.autoreset_mode, **kwargs
    )
    env = venv.unwrapped
    budget = env.budget
    plan = np.argsort(np.random.default_rng(0).random((num_envs, env.geometry.num_actions)), axis=1)[:, :budget]
    venv.reset(seed=0)
    clock = [0]

    def step() -> None:
        venv.step(plan[:, clock[0] % budget])
        clock[0] += 1

    return step, budget


def _is_clock(site: Site) -> bool:
    """cProfile's entries of the op timing itself: the mode's frames and the op's Python wrapper."""
    return site[0].endswith(_CLOCK)


def measure(args: argparse.Namespace, num_envs: int) -> dict[str, Any]:
    """Wall, aten and host ms per step at ``num_envs``, and host ms per step of each function."""
    step, budget = _stepper(args, num_envs)
    n = args.episodes * budget

    def steps() -> None:
        for _ in range(n):
            step()

    for _ in range(budget):  # warm-up: one episode and its autoreset
        step()
    walls, aten = [], []
    for _ in range(args.repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            steps()
            walls.append(1e3 * (time.perf_counter() - t0) / n)
        top = [e for e in prof.events() if e.cpu_parent is None]  # ops not called by another op
        aten.append(sum(e.cpu_time_total for e in top) / 1e3 / n)
        ops = len(top) / n
    # Per function: cProfile with every aten op run inside the mode's __torch_dispatch__, a function of its own, so
    # no function's own time holds tensor work (an op reached through an operator or indexing included).
    pr = cProfile.Profile()
    with _AtenClock():
        pr.enable()
        steps()
        pr.disable()
    stats = pstats.Stats(pr).stats  # type: ignore[attr-defined]
    funcs: dict[str, float] = {}
    for site, (_, _, own, _, callers) in stats.items():
        if _is_clock(site):
            continue
        # A built-in the ops themselves call (the mode's func(*args)) is tensor work: taken out per caller.
        own -= sum(tt for caller, (_, _, tt, _) in callers.items() if _is_clock(caller))
        funcs[f"{Path(site[0]).name}:{site[1]}({site[2]})"] = 1e3 * own / n
    host = [w - a for w, a in zip(walls, aten)]
    best = int(np.argmin(host))  # the least disturbed run (other processes share the CPU)
    return dict(
        num_envs=num_envs,
        wall_ms=walls[best],
        aten_ms=aten[best],
        host_ms=host[best],
        aten_ops=ops,
        functions=funcs,
    )


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per size, then the functions' host ms per step (largest first at the largest size)."""
    import envs

    tree = Path(envs.__file__).resolve().parents[1]
    lines = [
        f"## Host work of a vector step: {args.env}, tiny model, torch_obs={not args.numpy_obs}, "
        f"{args.autoreset_mode}, CPU ({torch.get_num_threads()} torch thread(s))",
        "",
        f"- tree: `{tree}`; command: `python benchmarks/host_step.py {' '.join(sys.argv[1:])}`",
        "",
        "| num_envs | wall ms per step | aten ms per step | **host ms per step** | aten ops per step |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['num_envs']:,} | {r['wall_ms']:.2f} | {r['aten_ms']:.2f} | **{r['host_ms']:.2f}** | "
            f"{r['aten_ops']:.0f} |"
        )
    last = runs[-1]["functions"]
    top = sorted(last, key=lambda k: -last[k])[: args.rows]
    sizes = " | ".join(f"{r['num_envs']:,}" for r in runs)
    lines += ["", f"| function: host ms per step at num_envs = | {sizes} |", "|---|" + "---:|" * len(runs)]
    for k in top:
        cells = " | ".join(f"{r['functions'].get(k, 0.0):.3f}" for r in runs)
        lines.append(f"| `{k}` | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="AVE-FashionMNIST-v0")
    p.add_argument("--num-envs", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--env-kwargs", default="{}", help="JSON, over the tiny model's arguments")
    p.add_argument("--autoreset-mode", default="same_step", choices=("same_step", "next_step"))
    p.add_argument("--numpy-obs", action="store_true", help="NumPy outputs (one copy to the host) over torch_obs")
    p.add_argument("--episodes", type=int, default=2, help="timed episodes of every env per size")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of the unprofiled steps (median)")
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="append the Markdown to this file")
    p.add_argument("--json", default=None, help="append one JSON line per size to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for num_envs in args.num_envs:
        r = measure(args, num_envs)
        runs.append(r)
        print(
            f"{num_envs} envs: host {r['host_ms']:.2f} ms per step (wall {r['wall_ms']:.2f}, aten {r['aten_ms']:.2f})",
            file=sys.stderr,
        )
        if args.json:
            import envs

            with open(args.json, "a") as f:
                f.write(json.dumps(dict(r, tree=str(Path(envs.__file__).resolve().parents[1]))) + "\n")
    text = report(args, runs)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
