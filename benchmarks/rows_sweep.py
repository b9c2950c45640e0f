"""Launch settings of training's row kernels, timed: each kernel's tile, warps and rows per program, and the
second stage of the column sums.

A training step's layer norms and residual adds (``avex.train.rows``, ``avex.train.epilogue``) run over ~10k to ~200k
rows of 128 or 192 features; the backward passes write per-program fp32 partial sums, which ``sum_partials`` sums.
Their first settings (``ROW_LAUNCH``) were not chosen by timing. This script times each function alone at a training
step's row counts and widths (CUDA graphs, bf16), for every (tile, warps, rows per program; for the residual norm's
backward also the tiles loaded ahead, ``--row-stages``) of a grid, changing one kernel's entry of ``ROW_LAUNCH`` at a
time, and then the second stage's tiles (``SUM_LAUNCH``, against PyTorch's ``sum(0).to(dtype)``). It prints, per
kernel, the default's and the fastest setting's time summed over the shapes, and a last line ``fastest: {...}`` of
Python literals that ``benchmarks/gpu/rows_tune.sh`` sets for a run of the step. On a GPU the kernels are compiled
first in parallel processes (Triton's on-disk cache). ``--device cpu`` runs the same under Triton's interpreter
(``TRITON_INTERPRET=1``) with wall-clock timing: a check of the script on tiny shapes, not a measurement.

    python benchmarks/rows_sweep.py --out results/rows_sweep.md
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
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's timer, as sdpa_short.py takes it
from env_kernels import per_call_us  # noqa: E402

from avex.layer_norm import layer_norm_forward, residual_norm_forward  # noqa: E402
from avex.platform_info import device_name, synchronize  # noqa: E402
from avex.train import epilogue as E  # noqa: E402
from avex.train import rows as R  # noqa: E402

DEFAULTS = dict(R.ROW_LAUNCH)
DEFAULT_SUM = R.SUM_LAUNCH
REAL_SUM = R.sum_partials


class Grid(NamedTuple):
    """What to time: row counts, widths (norms; column sums), and the settings' axes."""

    rows: tuple[int, ...] = (16384, 196608)  # the iterator's few tokens per image up to the decoder's ~190, x 1,024
    norm_widths: tuple[int, ...] = (128, 192, 384)  # the decoder's, the shipped encoder's, DeiT-III-S's
    sum_widths: tuple[int, ...] = (128, 192, 576, 768)  # bias gradients: also the encoder's qkv and fc1 outputs
    # The grid that fits one job on a fresh H200 (compiling included); 5 tiles x 3 warps x 4 did not (RESULTS 7.1).
    tiles: tuple[int, ...] = (1024, 2048, 4096)
    warps: tuple[int, ...] = (4, 8)
    per_program: tuple[int, ...] = (32, 64, 128, 256)
    row_stages: tuple[int, ...] = (1, 2)  # tiles in flight per program (RowLaunch.stages): the residual backward's
    sum_tiles: tuple[tuple[int, int], ...] = ((256, 8), (128, 16), (512, 4), (64, 32))


def _case(kernel: str, m: int, n: int, device: str) -> Callable[[], object]:
    """The call that runs ``kernel`` (a ROW_LAUNCH key) at m x n, bf16 (the step's common case of each)."""
    g = torch.Generator(device=device).manual_seed(0)
    x, y, dy = (torch.randn(m, n, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    w, b = torch.ones(n, device=device, dtype=torch.bfloat16), torch.zeros(n, device=device, dtype=torch.bfloat16)
    _, mean, rstd = layer_norm_forward(x, w, b, 1e-6)
    if kernel == "column_sum":
        return lambda: R.column_sum(dy)
    if kernel == "layer_norm_backward":
        return lambda: R.layer_norm_backward(x, dy, w, mean, rstd)
    if kernel == "residual_norm_forward":  # z = x + (y + b) * gamma, then its norm

        def forward() -> object:  # ROW_LAUNCH read at each call: the sweep changes the entry between timings
            launch = R.ROW_LAUNCH["residual_norm_forward"]
            return residual_norm_forward(x, y, b, w, w, b, 1e-6, tile=launch.tile, num_warps=launch.num_warps)

        return forward
    if kernel == "residual_norm_backward":  # with the norm, z's own gradient and gamma: every slot
        return lambda: E._residual_norm_backward(x, dy, y, w, mean, rstd, y, b, w)
    raise ValueError(f"no case for kernel {kernel!r}")


def _shapes(kernel: str, grid: Grid) -> list[tuple[int, int]]:
    return [(m, n) for m in grid.rows for n in (grid.sum_widths if kernel == "column_sum" else grid.norm_widths)]


def _settings(kernel: str, grid: Grid) -> list[R.RowLaunch]:
    """The grid for ``kernel``, its default first: rows per program only where a program loops over tiles (not the
    forward), and at most 64 tiles per program where the loop is unrolled (rows.py's kernels), at every width."""
    per_program = (DEFAULTS[kernel].rows,) if kernel == "residual_norm_forward" else grid.per_program
    stages = grid.row_stages if kernel == "residual_norm_backward" else (1,)
    out = [DEFAULTS[kernel]]
    for launch in itertools.starmap(R.RowLaunch, itertools.product(grid.tiles, grid.warps, per_program, stages)):
        if launch == DEFAULTS[kernel]:
            continue
        R.ROW_LAUNCH[kernel] = launch
        chunks = max(R.row_blocks(kernel, 1, n)[2] for _, n in _shapes(kernel, grid))
        R.ROW_LAUNCH[kernel] = DEFAULTS[kernel]
        if chunks <= 64 or kernel.startswith("residual"):
            out.append(launch)
    return out


def _time_us(fn: Callable[[], object], device: str) -> float:
    """us per call of fn: on CUDA a graph of 10 calls replayed 20 times (as the graphed step runs them); elsewhere
    the wall clock around one call (the interpreter's time says nothing of a GPU's)."""
    on_gpu = device == "cuda"
    return per_call_us(fn, torch.device(device), calls=10 if on_gpu else 1, reps=20)


def _compile(job: tuple[str, int, Grid]) -> int:
    """Build (and run once, on a few rows) every setting of one (kernel, width); the failures' count."""
    kernel, n, grid = job
    bad = 0
    for launch in _settings(kernel, grid):
        R.ROW_LAUNCH[kernel] = launch
        try:
            _case(kernel, 4096, n, "cuda")()
        except Exception:  # out of registers or shared memory: skipped when timed too
            bad += 1
    torch.cuda.synchronize()
    return bad


def _first_stages(
    lines: list[str], grid: Grid, device: str, workers: int, kernels: list[str]
) -> dict[str, tuple[int, ...]]:
    """Times the settings of each of ``kernels``; appends the table to ``lines``; returns each one's fastest setting."""
    if device == "cuda":
        jobs = [(k, n, grid) for k in kernels for n in sorted({n for _, n in _shapes(k, grid)})]
        with ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
            bad = sum(pool.map(_compile, jobs))
        print(f"compiled; {bad} settings failed to build or run", flush=True)
    lines += [
        "| kernel | default (tile, warps, rows, stages) | us | fastest | us | gain | per shape, m x n: default -> "
        "fastest us |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    fastest = {}
    for kernel in kernels:
        default = DEFAULTS[kernel]
        calls = {shape: _case(kernel, *shape, device) for shape in _shapes(kernel, grid)}
        per: dict[R.RowLaunch, dict[tuple[int, int], float]] = {}
        for launch in _settings(kernel, grid):
            R.ROW_LAUNCH[kernel] = launch
            try:
                per[launch] = {shape: _time_us(fn, device) for shape, fn in calls.items()}
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


def _torch_sum(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return partial.sum(dim=0).to(dtype)


def _second_stage(lines: list[str], grid: Grid, device: str) -> tuple[int, int]:
    """Times PyTorch's second stage and each of the grid's tiles; appends the table to ``lines``; returns the fastest
    tile."""
    kernels = ("column_sum", "layer_norm_backward")
    calls = [_case(k, *shape, device) for k in kernels for shape in _shapes(k, grid)]
    lines += ["", "| second stage | (BLOCK_P, BLOCK_W) | us, summed | gain over PyTorch's |", "|---|---|---:|---:|"]
    totals = {}
    for tile in [None, *grid.sum_tiles]:
        R.SUM_LAUNCH = tile or DEFAULT_SUM
        R.sum_partials = E.sum_partials = REAL_SUM if tile else _torch_sum  # the name both modules call
        totals[tile] = sum(_time_us(fn, device) for fn in calls)
    R.SUM_LAUNCH, R.sum_partials, E.sum_partials = DEFAULT_SUM, REAL_SUM, REAL_SUM
    for tile, us in sorted(totals.items(), key=lambda kv: kv[1]):
        name = "PyTorch: sum(0), then the cast" if tile is None else "sum_partials"
        lines.append(f"| {name} | {tile or ''} | {us:.1f} | {totals[None] / us:.2f}x |")
        print(lines[-1], flush=True)
    return min((t for t in totals if t is not None), key=totals.__getitem__)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stages", nargs="+", choices=["first", "second"], default=["first", "second"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    d = Grid()
    parser.add_argument("--kernels", nargs="+", choices=list(DEFAULTS), default=list(DEFAULTS))
    for name in ("rows", "norm_widths", "sum_widths", "tiles", "warps", "per_program", "row_stages"):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, nargs="+", default=getattr(d, name), help=f"default: {getattr(d, name)}")
    parser.add_argument("--sum-tiles", type=_ints, nargs="+", default=d.sum_tiles, help="BLOCK_P,BLOCK_W ...")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (--device cpu runs the check under Triton's interpreter)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    grid = Grid(*(tuple(getattr(args, name)) for name in Grid._fields))
    lines = [f"## Row kernels' launch settings, {device_name(args.device)}, torch {torch.__version__}, bf16, us per "
             f"call ({'CUDA graphs' if args.device == 'cuda' else 'the interpreter: not a GPU measure'}), summed over "
             f"rows {list(grid.rows)}", ""]  # fmt: skip
    fastest: dict[str, object] = {}
    if "first" in args.stages:
        fastest["ROW_LAUNCH"] = _first_stages(lines, grid, args.device, args.workers, args.kernels)
    if "second" in args.stages:
        fastest["SUM_LAUNCH"] = _second_stage(lines, grid, args.device)
    synchronize(args.device)
    text = "\n".join(lines) + "\n"
    print(text)
    # One line for jobs (gpu/rows_tune.sh): Python literals to set in avex.train.rows for a run of the step.
    print(f"fastest: {fastest}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
