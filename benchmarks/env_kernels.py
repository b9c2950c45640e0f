"""An env step's inference kernels against PyTorch's, and their launch settings.

  layer-norm  ``F.layer_norm`` against ``avex.layer_norm.layer_norm`` (its default launch, and the best of a sweep
              of rows per program x warps) on an env step's shapes: the Fashion-MNIST env's ViT (width 192) at
              --envs envs over 5 (iterator), 17, 49 (aggregator) and 197 tokens, the decoder's 197 x 128, and
              ViT-B/16's --vitb-batch x 197 x 768. Microseconds per call and GB/s (one read, one write). Then a
              few small row counts timed eagerly as well (launch included): where ``MIN_ROWS`` should lie.
  entropy     ``entropy_attention_kernel`` on the decoder's shapes (1 + grid x grid tokens, 4 heads of 32) at each
              batch of --batch, entropy only (what an env step runs), for every candidate ``Launch``: first
              BLOCK_M x BLOCK_N x warps at the default stages, then the stages of the best. Prints the
              ``LAUNCHES`` entry to put in avex/entropy_attention.py (the best by geometric mean over the batches)
              and times it with the attention output too (the decoder with reconstruction).
  decoder     the decoder's whole entropy map alone (what an env step runs: its row table read through an index)
              against the path it replaced (the whole sequence gathered, normed, projected), and the gather alone.

Times: CUDA graphs of --calls calls, median of --reps replays (device time, no launch overhead). On CPU (Triton's
interpreter, ``TRITON_INTERPRET=1``: for checking this script with tiny sizes) wall time.

    python benchmarks/env_kernels.py layer-norm entropy --out results/env_kernels.md --json results/env_kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import avex  # noqa: F401  (the timm import shim)
from avex.entropy_attention import DEFAULT_LAUNCH, Launch, _launch, entropy_attention_kernel
from avex.layer_norm import MIN_ROWS, _row_blocks, layer_norm
from avex.platform_info import device_name

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADS, HEAD_DIM = 4, 32  # the decoder's attention: width 128


def per_call_us(fn: Callable[[], Any], device: torch.device, calls: int, reps: int) -> float:
    """Median microseconds per call of ``fn``: a CUDA graph of ``calls`` calls replayed ``reps`` times; on CPU,
    wall time of ``calls`` calls."""
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e6 / calls
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del graph
    return statistics.median(times)


def eager_us(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Microseconds per call from Python, launches included (synchronised once after ``calls`` calls)."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e6 / calls


def _try(fn: Callable[[], float]) -> float | None:
    """``fn()``, or None where the launch fails to build or run (a candidate too large for the chip)."""
    try:
        return fn()
    except Exception as err:  # deliberately broad: Triton's compile and launch errors have no common type
        print(f"  candidate failed: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------- layer norm
def norm_shapes(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """(label, shape) of every layer norm an env step runs (and ViT-B/16's)."""
    shapes = [(f"env ViT, {e} envs x {s} tokens", (e, s, 192)) for e in args.envs for s in args.tokens]
    shapes += [(f"decoder, {e} envs x 197 tokens", (e, 197, 128)) for e in args.envs]
    return shapes + [(f"ViT-B/16, batch {args.vitb_batch} x 197 tokens", (args.vitb_batch, 197, 768))]


def layer_norm_tables(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[str], list]:
    lines = [
        "## Layer norm: F.layer_norm against avex.layer_norm.layer_norm (device time per call)",
        "",
        "| shape | rows | F.layer_norm us | kernel us | speed-up | kernel GB/s | best of sweep (rows x warps) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    records = []
    gen = torch.Generator(device=device).manual_seed(0)
    for label, shape in norm_shapes(args):
        n = shape[-1]
        x = torch.randn(shape, device=device, generator=gen).to(dtype)
        w, b = (torch.randn(n, device=device, generator=gen).to(dtype) for _ in range(2))
        timed = partial(per_call_us, device=device, calls=args.calls, reps=args.reps)
        torch_us = timed(partial(F.layer_norm, x, (n,), w, b, 1e-6))
        kernel_us = timed(partial(layer_norm, x, w, b, 1e-6))
        default_m = _row_blocks(n, 4096)[1]
        sweep = {}
        for block_m, warps in itertools.product(args.norm_rows or _around(default_m), args.norm_warps):
            run = partial(layer_norm, x, w, b, 1e-6, block_m=block_m, num_warps=warps)
            sweep[f"{block_m}x{warps}"] = _try(partial(timed, run))
        best = min((t, k) for k, t in sweep.items() if t is not None)
        gbs = 2 * x.numel() * x.element_size() / (kernel_us * 1e-6) / 1e9
        rows = x.numel() // n
        lines.append(
            f"| {label} x {n} | {rows:,} | {torch_us:.1f} | {kernel_us:.1f} | {torch_us / kernel_us:.2f}x | "
            f"{gbs:.0f} | {best[1]}: {best[0]:.1f} us (default {default_m}x4) |"
        )
        records.append(dict(shape=shape, torch_us=torch_us, kernel_us=kernel_us, sweep=sweep, default=f"{default_m}x4"))
        del x
    lines += ["", f"### Few rows (x 192): where MIN_ROWS ({MIN_ROWS}) should lie; eager = from Python, launch included"]
    lines += ["", "| rows | F.layer_norm eager us | kernel eager us | F.layer_norm device us | kernel device us |"]
    lines.append("|---:|---:|---:|---:|---:|")
    w, b = (torch.randn(192, device=device, generator=gen).to(dtype) for _ in range(2))
    for rows in args.small_rows:
        x = torch.randn(rows, 192, device=device, generator=gen).to(dtype)
        fns = (partial(F.layer_norm, x, (192,), w, b, 1e-6), partial(layer_norm, x, w, b, 1e-6))
        eager = [eager_us(f, device, args.calls * args.reps) for f in fns]
        dev = [per_call_us(f, device, args.calls, args.reps) for f in fns]
        lines.append(f"| {rows:,} | {eager[0]:.1f} | {eager[1]:.1f} | {dev[0]:.1f} | {dev[1]:.1f} |")
        records.append(dict(shape=(rows, 192), eager_us=eager, device_us=dev))
    return lines + [""], records


def _around(default_m: int) -> list[int]:
    """Rows per program to sweep: half, once, twice and four times the default (1..128)."""
    return sorted({max(1, min(128, m)) for m in (default_m // 2, default_m, 2 * default_m, 4 * default_m)})


# ------------------------------------------------------------------------------------------- entropy kernel
def entropy_tables(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict]:
    s = 1 + args.grid * args.grid
    gen = torch.Generator(device=device).manual_seed(0)
    qkvs = {
        b: (torch.randn(b, s, 3 * HEADS * HEAD_DIM, device=device, generator=gen) * 1.5).to(dtype) for b in args.batch
    }
    timed = partial(per_call_us, device=device, calls=args.calls, reps=args.reps)

    def run(b: int, launch: Launch | None, output: bool = False) -> float | None:
        call = partial(entropy_attention_kernel, qkvs[b], HEADS, first_query=1, output=output, launch=launch)
        return _try(lambda: timed(call))

    first = args.batch[0]
    want = entropy_attention_kernel(qkvs[first], HEADS, first_query=1, output=False)[1]
    assert want is not None
    stages0 = DEFAULT_LAUNCH.num_stages
    candidates = [Launch(m, n, w, stages0) for m, n, w in itertools.product(args.block_m, args.block_n, args.warps)]
    times: dict[Launch, list[float | None]] = {}
    for launch in candidates:
        got = _try(partial(_entropy, qkvs[first], launch))
        if got is None or not torch.allclose(got, want, atol=1e-3, rtol=0):
            times[launch] = [None] * len(args.batch)  # failed or wrong: not a candidate
            continue
        times[launch] = [run(b, launch) for b in args.batch]
    best = _best(times)
    if best is not None:
        for stages in args.stages:
            if stages != best.num_stages:
                launch = best._replace(num_stages=stages)
                times[launch] = [run(b, launch) for b in args.batch]
        best = _best(times)
    chosen = {b: _launch(s, HEAD_DIM, dtype, device) for b in args.batch}  # the same at every batch
    lines = [
        f"## Entropy kernel launch settings: decoder {args.grid}x{args.grid} grid (S = {s}), {HEADS} heads of "
        f"{HEAD_DIM}, entropy only, us per call",
        "",
        "| BLOCK_M | BLOCK_N | warps | stages | " + " | ".join(f"batch {b}" for b in args.batch) + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(args.batch),
    ]
    for launch, ts in sorted(times.items(), key=lambda kv: _score(kv[1])):
        mark = "*" if launch == chosen[first] else ""
        m, n, w, st = launch
        lines.append(f"| {m}{mark} | {n} | {w} | {st} | {_cells(ts)} |")
    record: dict[str, Any] = {
        "seq_len": s,
        "times": [dict(launch=list(k), us=v) for k, v in times.items()],
        "chosen_now": {b: list(c) for b, c in chosen.items()},
    }
    lines += ["", "(* = the launch the current table chooses at the first batch; '-' = failed or wrong)", ""]
    if best is not None:
        now = [run(b, None) for b in args.batch]
        now_out = [run(b, None, output=True) for b in args.batch]
        best_out = [run(b, best, output=True) for b in args.batch]
        dt = {torch.bfloat16: "torch.bfloat16", torch.float16: "torch.float16", torch.float32: "torch.float32"}[dtype]
        entry = f"LAUNCHES[({s}, {HEAD_DIM}, {dt})] = Launch{tuple(best)}"
        lines += [
            "| | " + " | ".join(f"batch {b}" for b in args.batch) + " |",
            "|---|" + "---:|" * len(args.batch),
            "| entropy only, current choice | " + _cells(now) + " |",
            "| entropy only, best | " + _cells(times[best]) + " |",
            "| entropy and output, current choice | " + _cells(now_out) + " |",
            "| entropy and output, best | " + _cells(best_out) + " |",
            "",
            f"Best by geometric mean over the batches: `{entry}` (put it in avex/entropy_attention.py's LAUNCHES"
            " where it beats the current choice at every batch).",
            "",
        ]
        record.update(best=list(best), entry=entry, now=now, now_output=now_out, best_output=best_out)
    return lines, record


def _entropy(qkv: torch.Tensor, launch: Launch) -> torch.Tensor:
    ent = entropy_attention_kernel(qkv, HEADS, first_query=1, output=False, launch=launch)[1]
    assert ent is not None
    return ent


def _score(ts: list[float | None]) -> float:
    """Geometric mean of the times; infinite where any failed."""
    return math.inf if any(t is None for t in ts) else math.exp(statistics.fmean(math.log(t) for t in ts if t))


def _best(times: dict[Launch, list[float | None]]) -> Launch | None:
    scored = [(_score(ts), launch) for launch, ts in times.items()]
    score, launch = min(scored, default=(math.inf, None))
    return launch if math.isfinite(score) else None


def _cells(ts: list[float | None]) -> str:
    return " | ".join("-" if t is None else f"{t:.1f}" for t in ts)


# ------------------------------------------------------------------------------------------- whole decoder
def decoder_tables(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict]:
    """The decoder's entropy map alone, as an env step computes it, against the path the row table replaced: the
    whole ``[B, 1 + N, 128]`` sequence gathered, normed and projected (``_sequence`` and the block; its index by the
    same kernel now), and that gather alone. Observed tokens: --observed (12 glimpses of 2x2: 48)."""
    from avex.decoder import GlimpseDecoder

    gen = torch.Generator(device=device).manual_seed(0)
    n = args.grid * args.grid
    lines = [
        f"## The decoder's entropy map alone: {args.grid}x{args.grid} grid, width 128, 4 heads, encoder width "
        f"{args.decoder_embed}, {args.observed} observed tokens, us per call",
        "",
        "| batch | row table (now) | whole sequence (before) | sequence gather alone | now / before |",
        "|---:|---:|---:|---:|---:|",
    ]
    record: dict[str, Any] = {}
    dec = GlimpseDecoder(args.decoder_embed, (args.grid, args.grid), 8, 1).to(device, dtype).eval()
    block = dec.blocks[0]
    timed = partial(per_call_us, device=device, calls=args.calls, reps=args.reps)
    for b in args.batch:
        cls = torch.randn(b, args.decoder_embed, device=device, generator=gen).to(dtype)
        tokens = torch.randn(b, args.observed, args.decoder_embed, device=device, generator=gen).to(dtype)
        cells = torch.rand(b, n, device=device, generator=gen).argsort(1)[:, : args.observed]
        coords = torch.stack([cells // args.grid, cells % args.grid], -1).float()

        def now(cls=cls, tokens=tokens, coords=coords) -> torch.Tensor | None:
            return dec(cls, tokens, coords, recon=False)[1]

        def before(cls=cls, tokens=tokens, coords=coords) -> torch.Tensor | None:
            return block(dec._sequence(cls, tokens, coords, None), first_query=1, output=False)[1]

        a, c = now(), before()
        assert a is not None and c is not None and torch.allclose(a.flatten(1), c, atol=1e-2, rtol=0)
        gather = partial(dec._sequence, cls, tokens, coords, None)
        t_now, t_before, t_gather = (_try(partial(timed, fn)) for fn in (now, before, gather))
        ratio = f"{t_now / t_before:.2f}" if t_now and t_before else "-"
        lines.append(f"| {b} | {_cells([t_now, t_before, t_gather])} | {ratio} |")
        record[b] = dict(now=t_now, before=t_before, gather=t_gather)
    return lines + [""], record


# ----------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", choices=["layer-norm", "entropy", "decoder"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--calls", type=int, default=10, help="calls per CUDA graph (CPU: calls timed)")
    p.add_argument("--reps", type=int, default=10, help="graph replays; the median is reported")
    p.add_argument("--envs", type=int, nargs="+", default=[16384], help="layer-norm: env batch sizes")
    p.add_argument("--tokens", type=int, nargs="+", default=[5, 17, 49, 197], help="layer-norm: tokens per env")
    p.add_argument("--vitb-batch", type=int, default=256)
    p.add_argument("--small-rows", type=int, nargs="*", default=[64, 512, 2048, 8192], help="layer-norm: eager rows")
    p.add_argument(
        "--norm-rows",
        type=int,
        nargs="*",
        default=None,
        help="layer-norm: rows per program to sweep (default: 1/2, 1, 2, 4 x the default)",
    )
    p.add_argument("--norm-warps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--grid", type=int, default=14, help="entropy: the decoder's grid side (S = 1 + grid**2)")
    p.add_argument("--batch", type=int, nargs="+", default=[16384, 256], help="entropy: batches (the first decides)")
    p.add_argument("--block-m", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--block-n", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], help="entropy: stages tried on the best")
    p.add_argument("--observed", type=int, default=48, help="decoder: observed tokens per row")
    p.add_argument("--decoder-embed", type=int, default=768, help="decoder: the encoder's width (ViT-B/16: 768)")
    p.add_argument("--out", default=None, help="Markdown tables")
    p.add_argument("--json", default=None, help="the same as JSON")
    args = p.parse_args(argv)
    for name in ("calls", "reps", "vitb_batch", "grid"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    lines = [
        f"# An env step's kernels, {args.dtype}, {device_name(device)}, torch {torch.__version__}",
        "",
        "command: `python benchmarks/env_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        "",
    ]
    report: dict[str, Any] = {"device": device_name(device), "dtype": args.dtype, "torch": torch.__version__}
    parts = {
        "layer-norm": ("layer_norm", layer_norm_tables),
        "entropy": ("entropy", entropy_tables),
        "decoder": ("decoder", decoder_tables),
    }
    for part in args.parts:
        key, tables = parts[part]
        with torch.inference_mode():
            table, report[key] = tables(args, device, dtype)
        print("\n".join(table))
        lines += table
        # Written after every part: a job's time-out keeps what finished.
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
