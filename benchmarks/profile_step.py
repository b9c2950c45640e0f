"""Where the time of a step goes: torch.profiler kernel table and cProfile host table.

Three targets, each one table of device time per op (self time, sorted) and one of host Python time:

    python benchmarks/profile_step.py env   --device cuda --num-envs 16384     # one vector step, as a table
    python benchmarks/profile_step.py tore  --device cuda --K 12 --batch 256   # eager TORE episode, ViT-B/16
    python benchmarks/profile_step.py tore  --device cuda --K 12 --batch 256 --graph --decoder entropy  # replayed
    python benchmarks/profile_step.py train --device cuda --batch 1024 --steps 20 --step graphed  # training steps
    python benchmarks/profile_step.py train --device cuda --batch 512 --steps 20 --step fused --shapes  # by shape

``env`` profiles ``budget`` steps of the batched vector env (one full episode of every env, so exactly one
autoreset), each step annotated, and writes one Markdown table of a vector step, plain and with its autoreset:
host time, time waiting for the device (synchronising runtime calls), kernels, host-to-device copies (pageable
ones counted apart), device-to-host copies; then the kernels and host functions that take the time, the
unprofiled ms per step and the synchronising calls per episode (PyTorch's sync debug mode). It uses only the
Gymnasium API, so it profiles any tree put first on ``PYTHONPATH`` (``benchmarks/gpu/env_step.sh`` runs it on
the trees before and after a change); ``--fake-imagenet N`` as in ``env_throughput.py``.
``tore`` profiles one episode of ``TOREViT.step`` (bf16, random weights; eager, or ``--graph`` as ``tore_speed.py
--mode graph`` replays it). Use it to find
the next lever; the speed figures themselves come from ``env_throughput.py`` and ``tore_speed.py``. ``train``
profiles ``--steps`` steps of ``avex train classifier``'s own run on Fashion-MNIST (``avex.train.start_training``:
its draws of K, T, canvases and glimpses, its optimiser and LR schedule) with the step ``--step`` (``eager``:
bf16 autocast; ``fused``; ``graphed``: the fused step as CUDA graphs) and adds how many kernels a step launches
and how busy they keep the GPU. The same step indices run in the warm-up (graph captures included), the timed
and the profiled runs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from avex.platform_info import device_name, synchronize


def _report(title: str, run, device: str, rows: int, shapes: bool = False) -> str:
    """Run ``run()`` once under torch.profiler and once under cProfile; both tables as text. ``shapes``: the
    profiler's table has a row per (op, input shapes), so that e.g. each matrix product's time shows apart."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=shapes) as prof:
        run()
        synchronize(device)
    wall_prof = time.perf_counter() - t0
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=shapes).table(
        sort_by=sort, row_limit=rows, max_name_column_width=60, max_shapes_column_width=90
    )
    # GPU activities (kernels, copies, sets) are the profiler's events on the CUDA device; their spans add up to
    # the GPU time.
    gpu = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in gpu) / 1e6  # s
    # From the first activity's start to the last one's end: the device's own view, without the host's start-up
    # (for a replayed CUDA graph, what is not busy there is time between kernels).
    span = (max(e.time_range.end for e in gpu) - min(e.time_range.start for e in gpu)) / 1e6 if gpu else 0.0
    launched = (
        (
            f"{len(gpu)} GPU activities, {busy * 1e3:.1f} ms of GPU time: the GPU busy {100 * busy / wall_prof:.0f}% "
            f"of the profiled wall time, {100 * busy / span:.0f}% of the {span * 1e3:.2f} ms from the first "
            f"activity's start to the last one's end\n\n"
        )
        if gpu
        else ""
    )
    pr = cProfile.Profile()
    synchronize(device)
    t0 = time.perf_counter()
    pr.enable()
    run()
    synchronize(device)
    pr.disable()
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(rows)
    return (
        f"## {title}\n\nwall {wall * 1e3:.1f} ms (cProfile run), {wall_prof * 1e3:.1f} ms (torch.profiler run)\n\n"
        f"{launched}"
        f"### device/op table (torch.profiler, sorted by {sort})\n\n```\n{table}\n```\n\n"
        f"### host Python (cProfile, tottime)\n\n```\n{buf.getvalue()}\n```\n"
    )


# Runtime calls that make the host wait for the device.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _trace_events(prof: profile) -> list[dict]:
    """The profiler's Chrome-trace events (complete events only): kernels, copies, runtime calls, annotations."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def _per_step(events: list[dict], label: str) -> tuple[list[dict[str, float]], dict[str, list[float]]]:
    """Per annotated step (``label`` i): host time, waits, kernels and copies; plus GPU time per kernel name.

    Host-side events fall in a step by time; device events by the runtime call that launched them.
    """
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e["name"].startswith(label) and e.get("cat") == "user_annotation"  # not the GPU-side copy of the range
    )
    steps: list[dict[str, float]] = [defaultdict(float, host_ms=(b - a) / 1e3) for a, b, _ in spans]
    step_of: dict[int, int] = {}
    for e in events:
        if e.get("cat") not in ("cuda_runtime", "cuda_driver"):
            continue
        i = next((k for k, (a, b, _) in enumerate(spans) if a <= e["ts"] < b), None)
        if i is None:
            continue
        step_of[e.get("args", {}).get("correlation", -1)] = i
        if e["name"] in SYNC_CALLS:
            steps[i]["syncs"] += 1
            steps[i]["sync_ms"] += e.get("dur", 0) / 1e3
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # name: [calls, ms] over all steps
    for e in events:
        cat, i = e.get("cat"), step_of.get(e.get("args", {}).get("correlation", -2))
        if i is None or cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        ms, st = e.get("dur", 0) / 1e3, steps[i]
        st["gpu_ms"] += ms
        if cat == "kernel":
            st["kernels"] += 1
            st["kernel_ms"] += ms
            kernels[e["name"]][0] += 1
            kernels[e["name"]][1] += ms
        elif cat == "gpu_memset":
            st["memsets"] += 1
        else:
            kind = "h2d" if "HtoD" in e["name"] else "d2h" if "DtoH" in e["name"] else "d2d"
            st[kind] += 1
            st[f"{kind}_ms"] += ms
            st[f"{kind}_mb"] += e.get("args", {}).get("bytes", 0) / 1e6
            st["pageable"] += kind != "d2d" and "Pageable" in e["name"]
    return [dict(st) for st in steps], dict(kernels)


def _mean(steps: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for st in steps for k in st}
    return {k: sum(st.get(k, 0.0) for st in steps) / max(len(steps), 1) for k in keys}


def _sync_count(run) -> int:
    """Synchronising CUDA calls PyTorch makes in ``run()`` (its sync debug mode, warning per call)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


ROWS = (
    ("host time of `step()`, ms", "{host_ms:.2f}"),
    ("of which waiting for the device: calls, ms", "{syncs:.1f}, {sync_ms:.2f}"),
    ("GPU kernels: count, ms", "{kernels:.0f}, {kernel_ms:.2f}"),
    ("host-to-device copies: count (pageable), MB, ms", "{h2d:.1f} ({pageable:.1f}), {h2d_mb:.2f}, {h2d_ms:.3f}"),
    ("device-to-host copies: count, MB, ms", "{d2h:.1f}, {d2h_mb:.2f}, {d2h_ms:.3f}"),
    ("device-to-device copies, memsets", "{d2d:.1f}, {memsets:.1f}"),
    ("GPU time (kernels + copies), ms", "{gpu_ms:.2f}"),
)


def _env_stepper(args: argparse.Namespace) -> tuple[Callable[[], bool], int]:
    """The vector env of ``args``, reset: a function taking one step (valid, non-repeating random positions)
    that says whether the step restarted episodes, and the budget."""
    import gymnasium as gym

    kwargs = json.loads(args.env_kwargs)
    if args.fake_imagenet:
        from env_throughput import fake_imagenet

        kwargs["root"] = fake_imagenet(args.fake_imagenet)
    cuda = args.device.startswith("cuda")
    venv = gym.make_vec(args.env, num_envs=args.num_envs, device=args.device, torch_obs=cuda, **kwargs)
    env = venv.unwrapped
    budget = env.budget
    plan = np.argsort(np.random.default_rng(0).random((args.num_envs, env.geometry.num_actions)), axis=1)[:, :budget]
    venv.reset(seed=0)
    clock = [0]

    def step() -> bool:
        restarts = bool((env.engine.steps + 1 >= budget).any())  # same-step autoreset at the budget
        venv.step(plan[:, clock[0] % budget])
        clock[0] += 1
        return restarts

    return step, budget


def _env_tables(args: argparse.Namespace, m: dict[str, Any], budget: int, host: dict) -> list[str]:
    """The Markdown of :func:`profile_env`'s measurements ``m``: header, step table, kernels, host functions."""
    cuda = args.device.startswith("cuda")
    title = f"{args.env}, {args.num_envs} envs, {args.device}, torch_obs={cuda}, {json.dumps(args.env_kwargs_raw)}"
    lines = [
        f"## {title}",
        "",
        f"- tree: `{m['tree']}`; command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`",
        f"- {device_name(args.device)}, torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- unprofiled: **{m['ms_per_step']:.2f} ms per vector step**, {m['env_steps_per_s']:,.0f} env-steps/s (mean "
        f"over two episodes of every env, autoresets included); synchronising calls per episode ({budget} steps, "
        f"PyTorch's sync debug mode): **{m['syncs_per_episode']}**",
        "",
        f"| one vector step (torch.profiler) | plain (mean of {m['plain_steps']}) | with autoreset |",
        "|---|---:|---:|",
    ]
    for name, fmt in ROWS:
        parts = (m["plain_step"], m["autoreset_step"])
        cells = [fmt.format_map(defaultdict(float, part)) if part else "-" for part in parts]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    kernels = m["kernels"]
    total = sum(ms for _, ms in kernels.values()) or 1.0
    lines += ["", "| kernel (whole episode) | calls per step | GPU ms per step | share |", "|---|---:|---:|---:|"]
    for name, (calls, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[: args.rows]:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| `{short}` | {calls / budget:.1f} | {ms / budget:.3f} | {100 * ms / total:.0f}% |")
    lines += ["", "| host function (cProfile, whole episode) | calls per step | own ms per step |", "|---|---:|---:|"]
    for (file, line, name), (_, ncalls, own, _, _) in sorted(host.items(), key=lambda kv: -kv[1][2])[: args.rows]:
        lines.append(f"| `{Path(file).name}:{line}({name})` | {ncalls / budget:.1f} | {1e3 * own / budget:.3f} |")
    return lines


def profile_env(args: argparse.Namespace) -> str:
    """One vector step, plain and with its autoreset: a table of host time, waits, kernels and copies."""
    import envs

    step, budget = _env_stepper(args)
    cuda = args.device.startswith("cuda")

    def cycle() -> None:
        for _ in range(budget):
            step()

    for _ in range(2):  # warm-up: two episodes of every env, autoresets included
        cycle()
    synchronize(args.device)
    t0 = time.perf_counter()
    cycle()
    cycle()
    synchronize(args.device)
    wall = (time.perf_counter() - t0) / (2 * budget)
    syncs = _sync_count(cycle) if cuda else 0
    restarted = []
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(budget):
            with record_function(f"vector step {i:02d}"):
                restarted.append(step())
        synchronize(args.device)
    steps, kernels = _per_step(_trace_events(prof), "vector step ")
    pr = cProfile.Profile()
    pr.enable()
    cycle()
    synchronize(args.device)
    pr.disable()
    m = dict(
        env=args.env,
        num_envs=args.num_envs,
        device=args.device,
        env_kwargs=args.env_kwargs_raw,
        tree=str(Path(envs.__file__).resolve().parents[1]),
        ms_per_step=1e3 * wall,
        env_steps_per_s=args.num_envs / wall,
        syncs_per_episode=syncs,
        plain_steps=sum(not r for r in restarted),
        plain_step=_mean([st for st, r in zip(steps, restarted) if not r]),
        autoreset_step=_mean([st for st, r in zip(steps, restarted) if r]),
        kernels=kernels,
    )
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(m) + "\n")
    host = pstats.Stats(pr).stats  # (file, line, name): (calls, ncalls, tottime, cumtime, callers)
    return "\n".join(_env_tables(args, m, budget, host)) + "\n"


def profile_tore(args: argparse.Namespace) -> str:
    """One episode of ``TOREViT.step`` (random weights): eager, or with ``--graph`` as ``tore_speed.py --mode graph``
    replays it (one CUDA graph per step), so that the kernels' summed time against the wall shows what a replayed
    step spends between kernels. ``--decoder entropy`` adds the entropy map an env step computes. ``--shapes`` (eager
    only: a graph's replay records no shapes) gives a row per op and input shapes, with the kernels taking any row
    count as they do inside a captured graph (``avex.layer_norm.MIN_ROWS`` lifted), so that it shows a replayed
    step's kernels by shape."""
    import avex.layer_norm

    if args.shapes and args.graph:
        raise SystemExit("profile_step.py tore: --shapes profiles the eager step (a graph's replay records no shapes)")
    min_rows = avex.layer_norm.MIN_ROWS
    if args.shapes:
        avex.layer_norm.MIN_ROWS = 1
    try:
        return _profile_tore(args)
    finally:
        avex.layer_norm.MIN_ROWS = min_rows


def _profile_tore(args: argparse.Namespace) -> str:
    """:func:`profile_tore`'s episode and report."""
    from avex.model import create_tore

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = create_tore(args.model, img_size=224, decoder_dim=128 if args.decoder else 0).eval()
    model.requires_grad_(False)
    model = model.to(dev, dtype)
    geo = model.geometry(2)
    cache = model.init_cache(args.batch, args.glimpses, args.K, geo.tokens_per_glimpse, dtype=dtype)
    # tore_speed's episodes and inputs (benchmarks/ is this script's folder, first on sys.path).
    from tore_speed import EagerEpisode, GraphEpisode, make_inputs

    inputs = make_inputs(model, geo, args.batch, args.glimpses, sets=1, seed=0, device=dev)
    with torch.inference_mode():  # GraphEpisode captures its graphs here
        runner = (GraphEpisode if args.graph else EagerEpisode)(model, cache, args.glimpses, args.decoder, inputs)

    @torch.inference_mode()
    def episode() -> None:
        runner.reset()
        runner.run()

    episode()
    how = "CUDA graphs, one per step" if args.graph else "eager"
    what = ", with the entropy map" if args.decoder else ""
    return _report(
        f"TORE {args.model} {args.dtype}: one episode of {args.glimpses} steps ({how}{what}), K={args.K}, "
        f"batch {args.batch}",
        episode,
        args.device,
        args.rows,
        shapes=args.shapes,
    )


def profile_train(args: argparse.Namespace) -> str:
    from avex.train import TrainConfig, start_training

    fused, graphs = {"eager": ("off", "off"), "fused": ("on", "off"), "graphed": ("on", "on")}[args.step]
    cfg = TrainConfig(
        dataset="fashion-mnist", device=args.device, batch_size=args.batch, steps=10_000, lr=1e-3, progress=False
    )
    training = start_training(replace(cfg, fused_step=fused, cuda_graphs=graphs))

    def steps() -> None:
        for step in range(args.steps):  # avex.train.train_classifier's loop body, less logging
            training.step(step)

    steps()  # warm-up (allocator, autotuning, graph captures)
    synchronize(args.device)
    t0 = time.perf_counter()
    steps()
    synchronize(args.device)
    plain = (time.perf_counter() - t0) / args.steps
    return _report(
        f"avex train classifier, Fashion-MNIST: {args.steps} steps at batch {args.batch} on {args.device}, "
        f"{training.run.plan.name} step ({plain * 1e3:.1f} ms per step unprofiled)",
        steps,
        args.device,
        args.rows,
        shapes=args.shapes,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=("env", "tore", "train"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    p.add_argument("--out", default=None, help="append the report to this Markdown file")
    p.add_argument("--env", default="AVE-FashionMNIST-v0")
    p.add_argument("--num-envs", type=int, default=1024)
    p.add_argument("--env-kwargs", default="{}")
    p.add_argument("--fake-imagenet", type=int, default=0, help="env: images per class of a fake ImageNet folder")
    p.add_argument("--json", default=None, help="env: append the figures as one JSON line to this file")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--K", type=int, default=12)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--glimpses", type=int, default=12)
    p.add_argument("--graph", action="store_true", help="tore: replay the episode as CUDA graphs (tore_speed's)")
    p.add_argument("--decoder", choices=("entropy",), default=None, help="tore: and the entropy map of each step")
    p.add_argument("--steps", type=int, default=20, help="training steps (train)")
    p.add_argument("--step", choices=("eager", "fused", "graphed"), default="eager", help="the training step (train)")
    p.add_argument("--shapes", action="store_true", help="train, tore: a row per op and input shapes (eager steps)")
    args = p.parse_args()
    args.env_kwargs_raw = json.loads(args.env_kwargs)
    report = {"env": profile_env, "tore": profile_tore, "train": profile_train}[args.target](args)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
