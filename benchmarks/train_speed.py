"""Training-step speed of ``avex train classifier``: the eager step against the fused and the graphed one.

Each mode builds the trainer's own run (:func:`avex.train.start_training`: data, model, optimiser, step function)
from the same seed, so every mode draws the same K, T, canvases and glimpses at every step, and:

1. runs ``--steps`` steps (the first pass: warm-up, allocations, autotuning, the graphed step's captures) and
   keeps their losses, to compare the first losses across modes;
2. runs the same step indices again (same K and T, every graph already captured) and times them: the
   steady-state time per step and images/s;
3. runs them a third time under torch.profiler: how long the GPU's kernels take per step (their summed
   durations, against the second pass's wall time: how busy the GPU is), how many there are, and the kernels
   that take the most time.

    python benchmarks/train_speed.py --device cuda --batch 1024 --steps 60 --modes eager graphed --out speed.md
    python benchmarks/train_speed.py --device cpu --batch 8 --steps 3 --modes eager fused   # a smoke run

Under ``torchrun`` every process runs the same: ``--batch`` is the GLOBAL batch, each rank steps on its part and
the step averages the gradients (DDP), the losses are the ranks' means and rank 0 times and reports (images/s in
total and per GPU). ``benchmarks/gpu/ddp.sh`` runs it on 1 and 2 GPUs (``benchmarks/ddp_report.py`` compares):

    torchrun --standalone --nproc_per_node=2 benchmarks/train_speed.py --device cuda --batch 1024 --steps 300 \
        --modes graphed --no-profile --json speed_np2.json

The model is the data set's (Fashion-MNIST: the shipped architecture) unless ``--model`` and the size flags say
otherwise (e.g. DeiT-III-S: ``--model deit3_small_patch16_224 --img-size 224 --patch 16 --depth 12 --embed-dim 384
--num-heads 6``, random weights, on one-channel Fashion-MNIST canvases). The Markdown report (``--out``) has one
table row per mode, the ratio to the first mode, and each mode's top kernels; ``--json`` also every step's loss.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from avex.platform_info import device_name, synchronize
from avex.train import TrainConfig, start_training
from avex.train.runtime import teardown_distributed

MODES = {"eager": ("off", "off"), "fused": ("on", "off"), "graphed": ("on", "on")}  # --fused-step, --cuda-graphs
ARCH = ("model", "img_size", "patch", "depth", "embed_dim", "num_heads")  # flags over the data set's defaults


def _config(args: argparse.Namespace, mode: str) -> TrainConfig:
    fused, graphs = MODES[mode]
    return TrainConfig(
        dataset="fashion-mnist",
        data_root=args.data_root,
        device=args.device,
        batch_size=args.batch,
        steps=args.total_steps,
        lr=1e-3,
        seed=0,
        progress=False,
        fused_step=fused,  # type: ignore[arg-type]  # a MODES value
        cuda_graphs=graphs,  # type: ignore[arg-type]
        **{k: getattr(args, k) for k in ARCH},
    )


def _ranks_mean(stats: list[torch.Tensor], world: int) -> list[float]:
    """Every step's loss, averaged over the processes (one sync)."""
    losses = torch.stack([s[0] for s in stats])
    if world > 1:
        dist.all_reduce(losses)
        losses /= world
    return [float(v) for v in losses.tolist()]


def _wait(device: torch.device, world: int) -> None:
    """This device's queued work done; with several processes, every process there too."""
    synchronize(device)
    if world > 1:
        dist.barrier()
        synchronize(device)


def _kernels(prof: Any, steps: int, rows: int) -> tuple[float, float, list[tuple[str, float, int]]]:
    """(GPU kernel ms per step, kernels per step, top kernels (name, ms per step, count per step))."""
    gpu = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in gpu:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e3)
    top = sorted(((n, sum(v) / steps, len(v) // steps) for n, v in by_name.items()), key=lambda r: -r[1])[:rows]
    return sum(sum(v) for v in by_name.values()) / steps, len(gpu) / steps, top


def measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One mode: first-pass losses, steady-state time per step, kernel profile."""
    training = start_training(_config(args, mode))
    run = training.run
    dev, world = run.device, run.world
    _wait(dev, world)
    t0 = time.perf_counter()
    first = [training.step(s)[3] for s in range(args.steps)]
    _wait(dev, world)
    first_pass = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = [training.step(s)[3] for s in range(args.steps)]
    _wait(dev, world)
    per_step = (time.perf_counter() - t0) / args.steps
    losses = _ranks_mean(first + second, world)
    busy, launches, top = float("nan"), float("nan"), []
    if args.profile and dev.type == "cuda":
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for s in range(args.steps):
                    training.step(s)
                synchronize(dev)
            busy, launches, top = _kernels(prof, args.steps, args.rows)
        except RuntimeError as err:  # a profiler that cannot trace here leaves the timings
            print(f"{mode}: profiler failed: {err}", flush=True)
    cfg = run.cfg
    result = dict(
        mode=mode,
        step=run.plan.name,
        arch=f"{cfg.model}, depth {cfg.depth}, width {cfg.embed_dim}, {cfg.img_size} px, patch {cfg.patch}",
        world=world,
        batch=args.batch,
        ms=per_step * 1e3,
        img_s=args.batch / per_step,
        img_s_per_gpu=args.batch / per_step / world,
        first_pass_s=first_pass,
        graphs=training.graphs,
        capture_s=getattr(training.step_fn, "capture_seconds", 0.0),
        losses=losses[: args.compare],
        all_losses=losses,  # both passes: the steps' losses, then the same step indices again
        gpu_ms=busy,
        kernels=launches,
        top=top,
        peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan"),
    )
    run.data.close()
    del training, run, first, second
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    if run_main(world):
        print(
            f"{mode}: {result['ms']:.2f} ms/step, {result['img_s']:.0f} images/s ({world} process(es)), GPU kernels "
            f"{busy:.2f} ms/step ({launches:.0f}), first pass {first_pass:.1f} s ({result['graphs']} graphs), "
            f"losses {result['losses']}",
            flush=True,
        )
    return result


def run_main(world: int) -> bool:
    """Whether this process reports: the only one, or rank 0 of several."""
    return world == 1 or dist.get_rank() == 0


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base = results[0]
    world = base["world"]
    lines = [
        f"## Training step, Fashion-MNIST ({base['arch']}), global batch {args.batch}, {world} x "
        f"{device_name(args.device)}, torch {torch.__version__}, {_now()}",
        "",
        f"`{command(world)}`: {args.steps} steps of the trainer's own draws, timed on their second pass (every graph "
        "captured); GPU kernel time per step: the summed durations of the kernels of the same steps, from "
        "torch.profiler (busy: that time over the wall time).",
        "",
        "| mode | ms per step | images/s (per GPU) | vs " + base["mode"] + " | GPU kernels ms per step (busy) "
        "| kernels per step | first pass s (graphs captured, s capturing) | peak GiB | first losses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"])) if r["losses"] else float("nan")
        lines.append(
            f"| {r['mode']} | {r['ms']:.2f} | {r['img_s']:,.0f} ({r['img_s_per_gpu']:,.0f}) "
            f"| {r['img_s'] / base['img_s']:.2f}x "
            f"| {r['gpu_ms']:.2f} ({100 * r['gpu_ms'] / r['ms']:.0f}%) | {r['kernels']:.0f} "
            f"| {r['first_pass_s']:.1f} ({r['graphs']}, {r['capture_s']:.1f}) | {r['peak_gib']:.1f} "
            f"| {', '.join(f'{v:.4f}' for v in r['losses'])} (max diff {diff:.4f}) |"
        )
    for r in results:
        if r["top"]:
            lines += ["", f"### Top kernels, {r['mode']} step (ms per step, launches per step)", ""]
            lines += ["| kernel | ms | launches |", "|---|---|---|"]
            lines += [f"| `{n[:110]}` | {ms:.3f} | {c} |" for n, ms, c in r["top"]]
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command(world: int) -> str:
    """This run's command line (under torchrun: with its number of processes)."""
    line = shlex.join(["python", *sys.argv])
    return line if world == 1 else line.replace("python", f"torchrun --standalone --nproc_per_node={world}", 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the installed one)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=60, help="steps per pass")
    p.add_argument("--total-steps", type=int, default=10_000, help="the run length the LR schedule assumes")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["eager", "graphed"])
    p.add_argument("--no-profile", dest="profile", action="store_false", help="no kernel profile (CUDA)")
    p.add_argument("--compare", type=int, default=5, help="first losses compared across modes")
    p.add_argument("--rows", type=int, default=15, help="top kernels listed per mode")
    p.add_argument("--out", default=None, help="append the Markdown report to this file")
    p.add_argument("--json", default=None, help="write the results, every step's loss included, to this JSON file")
    for name in ARCH:
        kind = str if name == "model" else int
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help="default: the data set's")
    args = p.parse_args()
    if args.device.startswith("cuda"):  # as the trainer sets them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = []
    for mode in args.modes:
        try:
            results.append(measure(args, mode))
        except Exception:  # report the modes that ran; the failure's traceback goes to the log
            if dist.is_initialized():  # the other processes would wait for this one's collectives
                raise
            print(f"{mode}: failed\n{traceback.format_exc()}", flush=True)
    if not results:
        raise SystemExit("every mode failed")
    world = results[0]["world"]
    if run_main(world):
        report = markdown(results, args)
        print(report)
        if args.out:
            with open(args.out, "a") as f:
                f.write(report + "\n")
        if args.json:
            info = dict(command=command(world), device=device_name(args.device), torch=torch.__version__, date=_now())
            with open(args.json, "w") as f:
                json.dump(dict(info, results=results), f, indent=1)
    teardown_distributed(world)


if __name__ == "__main__":
    main()
