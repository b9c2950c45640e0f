"""The MLP's exact GELU, forward and backward: PyTorch's kernels against a forward that also writes the slope.

PyTorch's GELU backward recomputes ``gelu'(p) = Phi(p) + p * phi(p)`` from the pre-activation p (an erf and an exp per
element), as its forward computed ``p * Phi(p)``. A forward that writes the slope beside h (one more tensor written,
in the compute dtype) leaves the backward one multiply, ``dp = dh * slope``, and the slope takes p's place among the
saved tensors. Whether that pays depends on whether those passes are bound by memory or by the erf: this times both
ways alone (bf16, CUDA graphs, us per call) at the training step's row counts, forward plus backward, with the
slope's rounding to bf16 reported against PyTorch's fp32 slope (max relative difference of dp).

    python benchmarks/gelu_slope.py --out gelu_slope.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env_kernels import per_call_us  # noqa: E402

# (rows, width): an encoder block's MLP at batch 1,024 (about 86k rows of 768 on average), a small one's, the decoder's
SHAPES = [(86016, 768), (20480, 768), (153600, 512)]


@triton.jit
def _gelu_slope_fwd(p_ptr, h_ptr, s_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    tl.store(h_ptr + offs, (x * cdf).to(h_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + offs, (cdf + x * pdf).to(s_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gelu_slope_bwd(dh_ptr, s_ptr, dp_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dh = tl.load(dh_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(dp_ptr + offs, (dh * s).to(dp_ptr.dtype.element_ty), mask=m)


def _us(fn: Callable[[], object]) -> float:
    return per_call_us(fn, torch.device("cuda"), calls=10, reps=20)


def measure(
    rows: int, width: int, blocks: list[int], warps: list[int]
) -> tuple[float, float, tuple[float, float, int, int], float]:
    """(PyTorch's forward us, its backward us, the slope's best (forward, backward, BLOCK, warps), dp's max relative
    difference from PyTorch's fp32 backward)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.randn(rows, width, device="cuda", generator=g).to(torch.bfloat16)
    dh = torch.randn(rows, width, device="cuda", generator=g).to(torch.bfloat16)
    h, s, dp = torch.empty_like(p), torch.empty_like(p), torch.empty_like(p)
    n = p.numel()
    t_fwd = _us(lambda: F.gelu(p))
    t_bwd = _us(lambda: torch.ops.aten.gelu_backward(dh, p))
    timed = []
    for block, w in itertools.product(blocks, warps):
        grid = (triton.cdiv(n, block),)
        fwd = functools.partial(_gelu_slope_fwd[grid], p, h, s, n, BLOCK=block, num_warps=w)
        bwd = functools.partial(_gelu_slope_bwd[grid], dh, s, dp, n, BLOCK=block, num_warps=w)
        timed.append((_us(fwd), _us(bwd), block, w))
    best = min(timed, key=lambda t: t[0] + t[1])
    grid = (triton.cdiv(n, best[2]),)
    _gelu_slope_fwd[grid](p, h, s, n, BLOCK=best[2], num_warps=best[3])
    _gelu_slope_bwd[grid](dh, s, dp, n, BLOCK=best[2], num_warps=best[3])
    assert (h.float() - F.gelu(p).float()).abs().max().item() < 1e-2, "the slope kernel's h is not GELU"
    ref = torch.ops.aten.gelu_backward(dh.float(), p.float())
    diff = ((dp.float() - ref).abs() / ref.abs().clamp(min=1e-3)).max().item()
    return t_fwd, t_bwd, best, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = [
        f"## GELU forward and backward, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
        f"{triton.__version__}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "`python benchmarks/gelu_slope.py`: bf16, CUDA graphs, us per call; PyTorch: `F.gelu` then "
        "`aten.gelu_backward`; slope: the Triton forward writing h and the slope, then `dh * slope`.",
        "",
        "| rows x width | PyTorch fwd | bwd | sum | slope (BLOCK, warps) | fwd | bwd | sum | slope / PyTorch | "
        "dp max rel diff |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    total_torch = total_slope = 0.0
    for rows, width in SHAPES:
        t_fwd, t_bwd, (fwd, bwd, block, warps), diff = measure(rows, width, args.blocks, args.warps)
        total_torch += t_fwd + t_bwd
        total_slope += fwd + bwd
        lines.append(
            f"| {rows} x {width} | {t_fwd:.1f} | {t_bwd:.1f} | {t_fwd + t_bwd:.1f} | ({block}, {warps}) | {fwd:.1f} | "
            f"{bwd:.1f} | {fwd + bwd:.1f} | {(fwd + bwd) / (t_fwd + t_bwd):.3f} | {diff:.1e} |"
        )
        print(lines[-1], flush=True)
    ratio = total_slope / total_torch
    lines += ["", f"Summed: PyTorch {total_torch:.1f} us, slope {total_slope:.1f} us ({ratio:.3f})."]
    print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
