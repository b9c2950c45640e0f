"""The second stage of training's two-stage column sums, timed: PyTorch's or ``sum_partials`` with several tiles.

A training step's layer-norm backward, residual-norm backward and bias gradients (``avex.train.rows``,
``avex.train.epilogue``) each write per-program fp32 partial sums (one program per 128 rows) and then sum them over
the programs. PyTorch's ``sum(0)`` then ``.to(dtype)`` took two launches, the first about 10 us; ``sum_partials``
takes one. This script times the three functions at a training step's row counts and widths (CUDA graphs, bf16)
with the second stage by PyTorch or by ``sum_partials`` with each tile (``SUM_LAUNCH``), and prints the sum over
the shapes per setting, fastest first.

    python benchmarks/partials_sweep.py --out results/partials_sweep.md      # CUDA only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avex.layer_norm import layer_norm_forward  # noqa: E402
from avex.train import epilogue as E  # noqa: E402
from avex.train import rows as R  # noqa: E402

ROWS = [16384, 196608]  # the iterator's few tokens per image up to the decoder's ~190 per image, x 1,024
WIDTHS = [128, 192, 576, 768]  # the decoder's and the shipped encoder's; its qkv and fc1 outputs (bias gradients)
TILES = [(256, 8), (128, 16), (512, 4), (64, 32)]


def _torch_sum(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return partial.sum(dim=0).to(dtype)


def _graph_us(fn, reps: int = 20, calls: int = 10) -> float:
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


def _cases(m: int, n: int) -> dict[str, object]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x, dy, dz = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    w, b = torch.ones(n, device="cuda", dtype=torch.bfloat16), torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    _, mean, rstd = layer_norm_forward(x, w, b, 1e-6)
    return {
        "column_sum": lambda: R.column_sum(dy),
        "layer_norm_backward": lambda: R.layer_norm_backward(x, dy, w, mean, rstd),
        "residual_norm_backward": lambda: E._residual_norm_backward(x, dy, dz, w, mean, rstd, None, b, None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("partials_sweep.py times CUDA kernels: run it on a GPU")
    settings = [("torch", None)] + [("sum_partials", t) for t in TILES]
    shapes = [(m, n) for m in ROWS for n in WIDTHS]
    cases = {shape: _cases(*shape) for shape in shapes}
    rows = []
    for second, tile in settings:
        if tile is not None:
            R.SUM_LAUNCH = tile
        summer = _torch_sum if second == "torch" else R.sum_partials
        R.sum_partials, E.sum_partials = summer, summer  # the name both modules call  # type: ignore[assignment]
        per = {}
        for shape in shapes:
            for name, fn in cases[shape].items():
                per[(shape, name)] = _graph_us(fn)
        rows.append((sum(per.values()), second, tile, per))
        print(f"{second:13s} tile {tile!s:10s} total {rows[-1][0]:8.1f} us", flush=True)
        R.sum_partials = E.sum_partials = _REAL_SUM  # type: ignore[assignment]
    rows.sort(key=lambda r: r[0])
    names = list(_cases(8, 8))
    head = "| second stage | (BLOCK_P, BLOCK_W) | total us | " + " | ".join(
        f"{name} {m}x{n}" for m, n in shapes for name in names
    )
    lines = [
        f"## Two-stage column sums, {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, us per call "
        "(CUDA graphs), fastest first",
        "",
        head + " |",
        "|" + "---|" * (3 + len(shapes) * len(names)),
    ]
    for total, second, tile, per in rows:
        cells = " | ".join(f"{per[(shape, name)]:.1f}" for shape in shapes for name in names)
        lines.append(f"| {second} | {tile or ''} | {total:.1f} | {cells} |")
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"fastest SUM_LAUNCH: {next(r for r in rows if r[1] == 'sum_partials')[2]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


_REAL_SUM = R.sum_partials

if __name__ == "__main__":
    main()
