"""Where the time of a step goes: torch.profiler kernel table and cProfile host table.

Three targets, each one table of device time per op (self time, sorted) and one of host Python time:

    python benchmarks/profile_step.py env   --device cuda --num-envs 16384     # one vector-env cycle
    python benchmarks/profile_step.py tore  --device cuda --K 12 --batch 256   # eager TORE episode, ViT-B/16
    python benchmarks/profile_step.py train --device cuda --batch 512 --steps 20  # Fashion-MNIST training steps

``env`` profiles ``budget`` steps of the batched vector env (one full episode of every env, so exactly one
autoreset); ``tore`` profiles one eager episode of ``TOREViT.step`` (bf16, random weights). Use it to find
the next lever; the speed figures themselves come from ``env_throughput.py`` and ``tore_speed.py``. ``train``
profiles ``--steps`` steps of ``avex train classifier``'s loop on Fashion-MNIST (the trainer's own K and T
draws, bf16 autocast, fused AdamW) and adds how many kernels a step launches and how busy they keep the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from avex.platform_info import synchronize


def _report(title: str, run, device: str, rows: int) -> str:
    """Run ``run()`` once under torch.profiler and once under cProfile; both tables as text."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        run()
        synchronize(device)
    wall_prof = time.perf_counter() - t0
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)
    # GPU activities (kernels, copies, sets) are the profiler's events on the CUDA device; their spans add up to
    # the GPU time.
    gpu = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in gpu) / 1e6  # s
    launched = (
        (
            f"{len(gpu)} GPU activities, {busy * 1e3:.1f} ms of GPU time: the GPU busy {100 * busy / wall_prof:.0f}% "
            f"of the profiled wall time\n\n"
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


def profile_env(args: argparse.Namespace) -> str:
    import gymnasium as gym

    kwargs = json.loads(args.env_kwargs)
    venv = gym.make_vec(
        args.env, num_envs=args.num_envs, device=args.device, torch_obs=args.device.startswith("cuda"), **kwargs
    )
    env = venv.unwrapped
    budget = env.budget
    plan = np.argsort(np.random.default_rng(0).random((args.num_envs, env.geometry.num_actions)), axis=1)[:, :budget]
    venv.reset(seed=0)
    for t in range(2 * budget):  # warm-up, autoresets included
        venv.step(plan[:, t % budget])

    def cycle() -> None:
        for t in range(budget):
            venv.step(plan[:, t])

    return _report(
        f"{args.env}: {budget} vector steps of {args.num_envs} envs on {args.device} ({kwargs})",
        cycle,
        args.device,
        args.rows,
    )


def profile_tore(args: argparse.Namespace) -> str:
    from avex.model import create_tore

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = create_tore(args.model, img_size=224).to(dev, dtype).eval()
    geo = model.geometry(2)
    cache = model.init_cache(args.batch, args.glimpses, args.K, geo.tokens_per_glimpse, dtype=dtype)
    rng = np.random.default_rng(0)
    canv = torch.randint(0, 256, (args.batch, 224, 224, 3), dtype=torch.uint8, device=dev)
    steps = []
    for _ in range(args.glimpses):
        r, c = (
            torch.as_tensor(v, device=dev)
            for v in geo.action_to_patch(rng.integers(0, geo.num_actions, size=args.batch))
        )
        steps.append((geo.cut(canv, r, c), geo.glimpse_coords(r, c)))

    @torch.inference_mode()
    def episode() -> None:
        model.reset_cache(cache)
        for pix, coords in steps:
            model.step(cache, pix, coords)

    episode()
    return _report(
        f"TORE {args.model} {args.dtype}: one eager episode of {args.glimpses} steps, K={args.K}, batch {args.batch}",
        episode,
        args.device,
        args.rows,
    )


def profile_train(args: argparse.Namespace) -> str:
    from avex.train import (
        TOREObjective,
        TrainConfig,
        build_classifier,
        draw_k_and_t,
        load_train_data,
        n_tiles,
        param_groups,
        resolve_config,
        sample_glimpses,
        step_rngs,
        train_step,
    )

    dev = torch.device(args.device)
    cfg = resolve_config(TrainConfig(dataset="fashion-mnist", device=args.device))
    model = build_classifier(cfg, 10).to(dev).train()
    geo = model.geometry(cfg.glimpse)
    objective = TOREObjective(model, geo, cfg.recon_weight, cfg.label_smoothing)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4, fused=dev.type == "cuda")
    source = load_train_data(cfg, 0, 1, dev).train
    counter = iter(range(10**9))

    def steps() -> None:
        for _ in range(args.steps):  # avex.train.train_classifier's loop body, less logging and the LR schedule
            host_rng, gen = step_rngs(0, next(counter), dev)
            K, T = draw_k_and_t(host_rng, model.depth, cfg.budget, n_tiles(geo))
            canvases, labels = source.random_batch(args.batch, gen)
            rows, cols = sample_glimpses(geo, args.batch, T, gen)
            train_step(objective, model, opt, (canvases, labels, rows, cols), K, True, cfg.grad_clip)

    steps()  # warm-up (allocator, autotuning)
    synchronize(args.device)
    t0 = time.perf_counter()
    steps()
    synchronize(args.device)
    plain = (time.perf_counter() - t0) / args.steps
    return _report(
        f"avex train classifier, Fashion-MNIST: {args.steps} steps at batch {args.batch} on {args.device} "
        f"({plain * 1e3:.1f} ms per step unprofiled)",
        steps,
        args.device,
        args.rows,
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
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--K", type=int, default=12)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--glimpses", type=int, default=12)
    p.add_argument("--steps", type=int, default=20, help="training steps (train)")
    args = p.parse_args()
    report = {"env": profile_env, "tore": profile_tore, "train": profile_train}[args.target](args)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
