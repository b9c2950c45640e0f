"""Launch settings of training's blocked attention kernels (``avex.train.kernels``), timed kernel by kernel.

The blocked kernels (forward, dK/dV, dQ) took their first settings untimed: query and key blocks of 64, 4 warps,
Triton's default pipelining. This script times each kernel alone at the rows a training step gives them (the
glimpse decoder's queries over 197 keys, the aggregator's rows past 128 tokens) for every (block_q, block_k,
num_warps, num_stages) in a grid, and prints, per kernel and head width, the fastest setting and the default's
time. The kernels are compiled first in parallel processes (Triton's on-disk cache), then timed in this one.

    python benchmarks/blocked_sweep.py --out results/blocked_sweep.md        # CUDA only
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avex.train import kernels as K  # noqa: E402

# (label, rows B, heads, head width, tokens S, first_query): the decoder (4 heads of 32, 197 keys) after 12 and
# after 2 glimpses; the aggregator (3 heads of 64) after 49 and after 40 glimpses.
SHAPES = [
    ("decoder, 12 glimpses", 1024, 4, 32, 197, 49),
    ("decoder, 2 glimpses", 1024, 4, 32, 197, 9),
    ("aggregator, 49 glimpses", 1024, 3, 64, 197, 0),
    ("aggregator, 40 glimpses", 1024, 3, 64, 161, 0),
]
BLOCKS = [(32, 32), (32, 64), (64, 32), (64, 64), (128, 32), (128, 64), (64, 128), (32, 128)]
WARPS = [2, 4, 8]
STAGES = [1, 2, 3]
KERNELS = ["fwd", "dkdv", "dq"]
DEFAULT = (64, 64, 4, None)


def _inputs(b: int, h: int, hd: int, s: int, fq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(b, s, 3 * h * hd, device="cuda", dtype=torch.bfloat16, generator=g)
    n_q = s - fq
    out, lse = K.blocked_attention_forward(qkv, h, fq)
    dout = torch.randn(b, n_q, h * hd, device="cuda", dtype=torch.bfloat16, generator=g)
    delta = (out.float() * dout.float()).reshape(b, n_q, h, hd).sum(-1).permute(0, 2, 1).contiguous()
    return dict(qkv=qkv, out=out, lse=lse, dout=dout, delta=delta, dqkv=torch.empty_like(qkv))


def _launch(kernel: str, t: dict[str, torch.Tensor], h: int, hd: int, s: int, fq: int, cfg: tuple) -> None:
    bq, bk, warps, stages = cfg
    import triton

    b, n_q = t["qkv"].shape[0], s - fq
    extra = {} if stages is None else {"num_stages": stages}
    qkv, dout = t["qkv"], t["dout"]
    if kernel == "fwd":
        K._blocked_attention_fwd_kernel[(b * h, triton.cdiv(n_q, bq))](
            qkv, t["out"], t["lse"], s, fq, hd**-0.5 * K._LOG2E, qkv.stride(0), qkv.stride(1), t["out"].stride(0),
            t["out"].stride(1), HEADS=h, HEAD_DIM=hd, BLOCK_Q=bq, BLOCK_K=bk, KEY_BLOCKS=triton.cdiv(s, bk),
            IEEE=False, num_warps=warps, **extra,
        )  # fmt: skip
        return
    args = (qkv, dout, t["lse"], t["delta"], t["dqkv"], s, fq, hd**-0.5,
            qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1))  # fmt: skip
    meta = dict(HEADS=h, HEAD_DIM=hd, BLOCK_Q=bq, BLOCK_K=bk, IEEE=False, num_warps=warps, **extra)
    if kernel == "dkdv":
        K._blocked_attention_dkdv_kernel[(b * h, triton.cdiv(s, bk))](*args, QUERY_BLOCKS=triton.cdiv(n_q, bq), **meta)
    else:
        K._blocked_attention_dq_kernel[(b * h, triton.cdiv(n_q, bq))](*args, KEY_BLOCKS=triton.cdiv(s, bk), **meta)


def _configs() -> list[tuple]:
    return [(bq, bk, w, st) for (bq, bk), w, st in itertools.product(BLOCKS, WARPS, STAGES)] + [DEFAULT]


def _compile(job: tuple[int, str]) -> int:
    """Compile (and run once) every setting of one (shape, kernel) in this process; the failures' count."""
    i, kernel = job
    _, b, h, hd, s, fq = SHAPES[i]
    t = _inputs(64, h, hd, s, fq)  # a few rows: only the build matters here
    bad = 0
    for cfg in _configs():
        try:
            _launch(kernel, t, h, hd, s, fq, cfg)
        except Exception:  # out of shared memory or registers: that setting is skipped later too
            bad += 1
    torch.cuda.synchronize()
    return bad


def _time(fn, reps: int = 7, calls: int = 10) -> float:
    """Median microseconds per call (CUDA events around ``calls`` launches, ``reps`` times)."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        z.record()
        z.synchronize()
        ts.append(a.elapsed_time(z) * 1e3 / calls)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    args = p.parse_args()
    jobs = [(i, k) for i in range(len(SHAPES)) for k in KERNELS]
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        bad = sum(pool.map(_compile, jobs))
    print(f"compiled; {bad} settings failed to build or run", flush=True)
    lines = [
        f"## Blocked attention launch settings, {torch.cuda.get_device_name()}, bf16, us per call",
        "",
        "| kernel | rows | default (64, 64, 4 warps) | fastest (block_q, block_k, warps, stages) | us | gain |",
        "|---|---|---:|---|---:|---:|",
    ]
    # Per kernel and head width: the setting with the least summed time over that width's shapes.
    totals: dict[tuple[str, int], dict[tuple, float]] = {}
    for label, b, h, hd, s, fq in SHAPES:
        t = _inputs(b, h, hd, s, fq)
        for kernel in KERNELS:
            times = {}
            for cfg in _configs():
                run = functools.partial(_launch, kernel, t, h, hd, s, fq, cfg)
                try:
                    times[cfg] = _time(run)
                except Exception:
                    continue
            best = min(times, key=times.__getitem__)
            d = times[DEFAULT]
            lines.append(f"| {kernel} | {label} | {d:.1f} | {best} | {times[best]:.1f} | {d / times[best]:.2f}x |")
            print(lines[-1], flush=True)
            agg = totals.setdefault((kernel, hd), {})
            for cfg in _configs():  # a setting that failed on one shape is out of the sum
                agg[cfg] = agg.get(cfg, 0.0) + times.get(cfg, float("inf"))
    lines += ["", "Summed over each head width's rows:", ""]
    lines += ["| kernel | head width | default us | fastest setting | us | gain |", "|---|---:|---:|---|---:|---:|"]
    for (kernel, hd), agg in totals.items():
        best = min(agg, key=agg.__getitem__)
        d = agg[DEFAULT]
        lines.append(f"| {kernel} | {hd} | {d:.1f} | {best} | {agg[best]:.1f} | {d / agg[best]:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
