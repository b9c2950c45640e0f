"""Launch settings of training's row kernels, timed: each kernel's tile, warps and rows per program, and the
second stage of the column sums.

A training step's layer norms and residual adds (``avex.train.rows``, ``avex.train.epilogue``) run over ~10k to
~200k rows of 128 or 192 features; the backward passes write per-program fp32 partial sums, which ``sum_partials``
sums. Their first settings (``ROW_LAUNCH``) were chosen so that ptxas spills no registers, not by timing. This
script times each function alone at a training step's row counts and widths (CUDA graphs, bf16), for every
(tile, warps, rows per program) of a grid, changing one kernel's entry of ``ROW_LAUNCH`` at a time, and then the
second stage's tiles (``SUM_LAUNCH``, against PyTorch's ``sum(0).to(dtype)``). It prints, per kernel, the default's
and the fastest setting's time summed over the shapes. The kernels are compiled first in parallel processes
(Triton's on-disk cache), then timed in this one.

    python benchmarks/rows_sweep.py --out results/rows_sweep.md              # CUDA only
    python benchmarks/rows_sweep.py --stages second --out results/sums.md    # the second stage alone
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avex.layer_norm import layer_norm_forward  # noqa: E402
from avex.train import epilogue as E  # noqa: E402
from avex.train import rows as R  # noqa: E402

ROWS = [16384, 196608]  # the iterator's few tokens per image up to the decoder's ~190 per image, x 1,024
NORM_WIDTHS = [128, 192, 384]  # the decoder's, the shipped encoder's, DeiT-III-S's
SUM_WIDTHS = [128, 192, 576, 768]  # bias gradients: also the shipped encoder's qkv and fc1 outputs
TILES, WARPS, PER_PROGRAM = [512, 1024, 2048, 4096, 8192], [2, 4, 8], [64, 128, 256, 512]
SUM_TILES = [(256, 8), (128, 16), (512, 4), (64, 32)]
DEFAULTS = dict(R.ROW_LAUNCH)
DEFAULT_SUM = R.SUM_LAUNCH
REAL_SUM = R.sum_partials


def _cases(kernel: str, m: int, n: int) -> Callable[[], object]:
    """The call that runs ``kernel`` (a ROW_LAUNCH key, or "sums": the three backward passes) at m x n, bf16."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y, dy = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    w, b = torch.ones(n, device="cuda", dtype=torch.bfloat16), torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    _, mean, rstd = layer_norm_forward(x, w, b, 1e-6)
    if kernel == "column_sum":
        return lambda: R.column_sum(dy)
    if kernel == "layer_norm_backward":
        return lambda: R.layer_norm_backward(x, dy, w, mean, rstd)
    if kernel == "residual_norm_forward":  # z = x + (y + b) * gamma, then its norm: the step's common case
        return lambda: E._residual_norm_forward(x, y, b, w, w, b, 1e-6)
    if kernel == "residual_norm_backward":
        return lambda: E._residual_norm_backward(x, dy, y, w, mean, rstd, y, b, w)
    raise ValueError(kernel)


def _shapes(kernel: str) -> list[tuple[int, int]]:
    return [(m, n) for m in ROWS for n in (SUM_WIDTHS if kernel == "column_sum" else NORM_WIDTHS)]


def _settings(kernel: str) -> list[R.RowLaunch]:
    """The grid for ``kernel``, its default first: rows per program only where a program loops over tiles (not the
    forward), and at most 64 tiles per program where the loop is unrolled (rows.py's kernels), at every width."""
    per_program = [DEFAULTS[kernel].rows] if kernel == "residual_norm_forward" else PER_PROGRAM
    grid = (R.RowLaunch(t, w, r) for t, w, r in itertools.product(TILES, WARPS, per_program))
    out = [DEFAULTS[kernel]]
    for launch in (g for g in grid if g != DEFAULTS[kernel]):
        old, R.ROW_LAUNCH[kernel] = R.ROW_LAUNCH[kernel], launch
        chunks = max(R.row_blocks(kernel, 1, n)[2] for _, n in _shapes(kernel))
        R.ROW_LAUNCH[kernel] = old
        if chunks <= 64 or kernel.startswith("residual"):
            out.append(launch)
    return out


def _graph_us(fn: Callable[[], object], reps: int = 20, calls: int = 10) -> float:
    """us per call of fn, replayed from a CUDA graph of ``calls`` calls (as the graphed step runs them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * calls)


def _compile(job: tuple[str, int]) -> int:
    """Build (and run once, on a few rows) every setting of one (kernel, width); the failures' count."""
    kernel, n = job
    bad = 0
    for launch in _settings(kernel):
        R.ROW_LAUNCH[kernel] = launch
        try:
            _cases(kernel, 4096, n)()
        except Exception:  # out of registers or shared memory: skipped when timed too
            bad += 1
    torch.cuda.synchronize()
    return bad


def _first_stages(lines: list[str], workers: int) -> dict[str, tuple[int, int, int]]:
    """Times every kernel's grid; appends the table to ``lines``; returns each kernel's fastest setting."""
    jobs = [(k, n) for k in DEFAULTS for n in sorted({n for _, n in _shapes(k)})]
    with ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        bad = sum(pool.map(_compile, jobs))
    print(f"compiled; {bad} settings failed to build or run", flush=True)
    lines += [
        "| kernel | default (tile, warps, rows) | us | fastest | us | gain | per shape, m x n: default -> fastest us |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    fastest = {}
    for kernel, default in DEFAULTS.items():
        calls = {shape: _cases(kernel, *shape) for shape in _shapes(kernel)}
        per: dict[R.RowLaunch, dict[tuple[int, int], float]] = {}
        for launch in _settings(kernel):
            R.ROW_LAUNCH[kernel] = launch
            try:
                per[launch] = {shape: _graph_us(fn) for shape, fn in calls.items()}
            except Exception:
                continue
        R.ROW_LAUNCH[kernel] = default
        best = min(per, key=lambda s: sum(per[s].values()))
        d, f = sum(per[default].values()), sum(per[best].values())
        shapes = ", ".join(f"{m}x{n}: {per[default][(m, n)]:.1f} -> {per[best][(m, n)]:.1f}" for m, n in calls)
        lines.append(f"| {kernel} | {tuple(default)} | {d:.1f} | {tuple(best)} | {f:.1f} | {d / f:.2f}x | {shapes} |")
        print(lines[-1], flush=True)
        fastest[kernel] = tuple(best)
    return fastest


def _second_stage(lines: list[str]) -> tuple[int, int]:
    """Times PyTorch's second stage and each of SUM_TILES; appends the table to ``lines``; returns the fastest tile."""
    calls = {(k, shape): _cases(k, *shape) for k in ("column_sum", "layer_norm_backward") for shape in _shapes(k)}
    lines += ["", "| second stage | (BLOCK_P, BLOCK_W) | us, summed | gain over PyTorch's |", "|---|---|---:|---:|"]
    totals = {}
    for tile in [None, *SUM_TILES]:
        summer = REAL_SUM if tile else (lambda partial, dtype: partial.sum(dim=0).to(dtype))
        R.SUM_LAUNCH = tile or DEFAULT_SUM
        R.sum_partials = E.sum_partials = summer  # the name both modules call
        totals[tile] = sum(_graph_us(fn) for fn in calls.values())
    R.SUM_LAUNCH, R.sum_partials, E.sum_partials = DEFAULT_SUM, REAL_SUM, REAL_SUM
    for tile, us in sorted(totals.items(), key=lambda kv: kv[1]):
        name = "PyTorch: sum(0), then the cast" if tile is None else "sum_partials"
        lines.append(f"| {name} | {tile or ''} | {us:.1f} | {totals[None] / us:.2f}x |")
        print(lines[-1], flush=True)
    return min((t for t in totals if t is not None), key=totals.__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stages", nargs="+", choices=["first", "second"], default=["first", "second"])
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("rows_sweep.py times CUDA kernels: run it on a GPU")
    lines = [f"## Row kernels' launch settings, {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, us "
             f"per call (CUDA graphs), summed over rows {ROWS}", ""]  # fmt: skip
    fastest: dict[str, object] = {}
    if "first" in args.stages:
        fastest["ROW_LAUNCH"] = _first_stages(lines, args.workers)
    if "second" in args.stages:
        fastest["SUM_LAUNCH"] = _second_stage(lines)
    text = "\n".join(lines) + "\n"
    print(text)
    # One line for jobs (gpu/rows_tune.sh): Python literals to set in avex.train.rows for a run of the step.
    print(f"fastest: {fastest}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
