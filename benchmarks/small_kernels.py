"""A K=12 TORE step's small kernels at their own shapes, under every launch setting they could take (issue 15).

At K = depth a ViT-B/16 step at batch 256 runs each block on 1,280 rows (256 x 5 tokens), where a kernel's fixed cost
rather than its bandwidth sets its time. This times, in CUDA graphs of back-to-back calls (what a replayed step
pays per kernel, launch gaps included), bf16, microseconds per call:

  gelu       PyTorch's exact GELU against a Triton one (erf, fp32 arithmetic) over blocks x warps, on [rows, 3072];
             "equal" says whether the Triton output equals PyTorch's bit for bit.
  resnorm    ``avex.layer_norm.residual_norm_forward`` (the fused blocks' residual add and norm) over tiles x warps.
  layernorm  ``avex.layer_norm.layer_norm`` over rows per program x warps, and ``F.layer_norm``.
  attention  ``avex.attention.short_attention`` on 5 tokens, 12 heads, over warps.
  products   the block's four products (qkv, proj, fc1, fc2 as the step runs them: with and without the bias) under
             each of PyTorch's BLAS back-ends (``torch.backends.cuda.preferred_blas_library``).

Each group's table marks avex's own choice (the default launch) and the fastest.

    python benchmarks/small_kernels.py --out small_kernels.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env_kernels import per_call_us  # noqa: E402

import avex  # noqa: E402,F401  (the timm import shim)
from avex.attention import _launch as attention_launch  # noqa: E402
from avex.attention import short_attention  # noqa: E402
from avex.layer_norm import RESIDUAL_TILE, _row_blocks, layer_norm, residual_norm_forward  # noqa: E402
from avex.platform_info import device_name  # noqa: E402

WIDTH, HIDDEN, HEADS, TOKENS = 768, 3072, 12, 5  # ViT-B/16; a K=12 step's iterator input: CLS and 4 glimpse tokens


@triton.jit
def _gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m).to(tl.float32)
    y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=m)


def triton_gelu(x: torch.Tensor, block: int, warps: int) -> torch.Tensor:
    y = torch.empty_like(x)
    _gelu_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block, num_warps=warps)
    return y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1280, 5, 6912], help="rows: K=12 b256, b1, a K=0 step's")
    p.add_argument("--calls", type=int, default=20, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=15, help="graph replays; the median is reported")
    p.add_argument("--out", default=None, help="Markdown tables")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("small_kernels.py times CUDA kernels in CUDA graphs: run it on a machine with a CUDA GPU")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    groups: dict[str, list[tuple[str, float, bool]]] = {}

    def time(group: str, setting: str, fn: Callable[[], Any], default: bool = False) -> None:
        us = per_call_us(fn, dev, args.calls, args.reps)
        groups.setdefault(group, []).append((setting, us, default))
        print(f"{group} | {setting}: {us:.2f} us", flush=True)

    for rows in args.rows:
        x = torch.randn(rows, HIDDEN, device=dev, dtype=dtype) * 2
        ref = F.gelu(x)
        time(f"gelu [{rows}, {HIDDEN}]", "PyTorch", partial(F.gelu, x), default=True)
        for block, warps in itertools.product((1024, 2048, 4096), (4, 8)):
            equal = torch.equal(triton_gelu(x, block, warps), ref)
            time(f"gelu [{rows}, {HIDDEN}]", f"Triton block {block}, {warps} warps (equal: {equal})",
                 partial(triton_gelu, x, block, warps))  # fmt: skip

        x, y = (torch.randn(rows, WIDTH, device=dev, dtype=dtype) for _ in range(2))
        b, w, bias = (torch.randn(WIDTH, device=dev, dtype=dtype) for _ in range(3))
        for tile, warps in itertools.product((768, 1024, 2048, 4096), (1, 2, 4, 8)):
            time(f"resnorm [{rows}, {WIDTH}]", f"tile {tile}, {warps} warps",
                 partial(residual_norm_forward, x, y, b, None, w, bias, 1e-6, tile=tile, num_warps=warps),
                 default=(tile, warps) == (RESIDUAL_TILE, 4))  # fmt: skip
        default_m = _row_blocks(WIDTH, 4096)[1]
        time(f"layernorm [{rows}, {WIDTH}]", "F.layer_norm", partial(F.layer_norm, x, (WIDTH,), w, bias, 1e-6))
        for bm, warps in itertools.product((1, 2, 4, 8), (1, 2, 4)):
            time(f"layernorm [{rows}, {WIDTH}]", f"{bm} rows per program, {warps} warps",
                 partial(layer_norm, x, w, bias, 1e-6, block_m=bm, num_warps=warps),
                 default=(bm, warps) == (default_m, 4))  # fmt: skip

    for batch in (256, 1):
        qkv = torch.randn(batch, TOKENS, 3 * WIDTH, device=dev, dtype=dtype)
        block_s, default_warps = attention_launch(TOKENS)
        for warps in (1, 2, 4):
            time(f"attention [{batch}, {TOKENS}, {3 * WIDTH}]", f"{warps} warps",
                 partial(short_attention, qkv, HEADS, block_s=block_s, num_warps=warps),
                 default=warps == default_warps)  # fmt: skip

    m = 256 * TOKENS
    for lib in ("default", "cublas", "cublaslt"):
        if lib != "default":
            torch.backends.cuda.preferred_blas_library(lib)
        for name, k, n, with_bias in (("qkv", WIDTH, 3 * WIDTH, True), ("proj", WIDTH, WIDTH, False),
                                      ("fc1", WIDTH, HIDDEN, True), ("fc2", HIDDEN, WIDTH, False)):  # fmt: skip
            a = torch.randn(m, k, device=dev, dtype=dtype)
            wt = torch.randn(n, k, device=dev, dtype=dtype)
            bias_t = torch.randn(n, device=dev, dtype=dtype) if with_bias else None
            time(f"{name} [{m}, {k}] x [{k}, {n}]", f"BLAS {lib}", partial(F.linear, a, wt, bias_t),
                 default=lib == "default")  # fmt: skip

    lines = [
        "# A K=12 step's small kernels under every launch setting (benchmarks/small_kernels.py)",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- device: {device_name(dev)}; torch {torch.__version__}, triton {triton.__version__}; bf16",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- us per call: CUDA graphs of {args.calls} back-to-back calls, median of {args.reps} replays",
        "",
        "| kernel | avex's launch (us) | fastest setting | its us | fastest / avex's |",
        "|---|---:|---|---:|---:|",
    ]
    for group, rows_ in groups.items():
        ours = next((us for _, us, d in rows_ if d), float("nan"))
        best = min(rows_, key=lambda r: r[1])
        lines.append(f"| {group} | {ours:.2f} | {best[0]} | {best[1]:.2f} | {best[1] / ours:.2f} |")
    lines += ["", "## Every setting", "", "| kernel | setting | us |", "|---|---|---:|"]
    lines += [f"| {g} | {s}{' (avex)' if d else ''} | {us:.2f} |" for g, r in groups.items() for s, us, d in r]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
