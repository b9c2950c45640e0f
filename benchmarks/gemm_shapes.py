"""How fast can TORE's small-row GEMMs go? cuBLAS (``F.linear``) against Triton tilings, per ViT-B/16 shape.

A K=12 TORE step at batch 256 multiplies 1,280-row activations (256 rows x [CLS + 4 glimpse tokens]) by every
block's weights, and runs those GEMMs at about 45% of the GPU's peak against 65% for K=0's larger ones
(RESULTS.md section 3). This script measures, for each of a block's four products (qkv, proj, fc1, fc2) at
the given row counts: cuBLAS's time, the best time of a plain Triton tiled matmul over a small set of tilings
(with its tiling), and the same kernels with the bias and GELU in the epilogue (fc1 only), each timed in a CUDA
graph (``triton.testing.do_bench_cudagraph``). It decides whether a GEMM of our own could pay at K=12; it
changes nothing in avex.

Usage (CUDA):  python benchmarks/gemm_shapes.py --rows 1280 6912 --out results.md
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

SHAPES = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}  # (in, out)
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, SPLIT_K)
TILINGS = [
    (128, 256, 64, 3, 8, 1),
    (128, 128, 64, 3, 8, 1),
    (128, 128, 64, 4, 4, 1),
    (128, 64, 64, 4, 4, 1),
    (64, 256, 64, 4, 4, 1),
    (64, 128, 64, 4, 4, 1),
    (64, 64, 64, 4, 4, 1),
    (64, 128, 128, 3, 4, 1),
    (128, 64, 128, 3, 8, 1),
    (64, 64, 128, 3, 4, 1),
    (128, 128, 64, 3, 8, 2),
    (64, 128, 64, 4, 4, 2),
    (128, 64, 64, 4, 4, 2),
    (64, 64, 64, 4, 4, 4),
]


@triton.jit
def _matmul(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    K_STEPS: tl.constexpr, GELU: tl.constexpr,
):  # fmt: skip
    """y[M, N] (+)= x[M, K] @ w[N, K]^T (+ b, GELU); SPLIT_K > 1 adds fp32 partial sums of K_STEPS * BLOCK_K
    columns into y."""
    pid, split = tl.program_id(0), tl.program_id(1)
    n_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: consecutive programs share a band of x's rows (L2 reuse).
    group = 8 * n_n
    first_m = (pid // group) * 8
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, 8)
    pm = first_m + (pid % group) % size_m
    pn = (pid % group) // size_m
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_blk = x_ptr + rm[:, None] * K + (split * K_STEPS * BLOCK_K + rk)[None, :]
    w_blk = w_ptr + rn[None, :] * K + (split * K_STEPS * BLOCK_K + rk)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(K_STEPS):
        a = tl.load(x_blk, mask=rm[:, None] < M, other=0.0)
        b = tl.load(w_blk, mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc)
        x_blk += BLOCK_K
        w_blk += BLOCK_K
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if split == 0:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask)


def triton_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, tiling: tuple, gelu: bool = False) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T + b with one tiling; split-K accumulates in fp32 (no GELU)."""
    bm, bn, bk, stages, warps, split = tiling
    M, K = x.shape
    N = w.shape[0]
    if split > 1:
        y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    _matmul[grid](x, w, b, y, M, N, K, bm, bn, bk, split, K // (split * bk), gelu, num_stages=stages, num_warps=warps)
    return y


def _bench(fn: Callable[[], object]) -> float:
    """Microseconds per call, replayed in a CUDA graph."""
    return float(do_bench_cudagraph(fn)) * 1e3


def measure(M: int, name: str, k_in: int, n_out: int) -> list[str]:
    """Table rows for one product at M rows: cuBLAS, the best tiling (and, for fc1, the GELU epilogue)."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(M, k_in, device=dev, dtype=dt)
    w = torch.randn(n_out, k_in, device=dev, dtype=dt) / k_in**0.5
    b = torch.randn(n_out, device=dev, dtype=dt)
    ref = F.linear(x, w, b)
    t_ref = _bench(partial(F.linear, x, w, b))
    best: tuple[float, tuple | None, float] = (float("inf"), None, 0.0)
    for tiling in TILINGS:
        if k_in % (tiling[2] * tiling[5]):
            continue
        try:
            out = triton_linear(x, w, b, tiling)
            t = _bench(partial(triton_linear, x, w, b, tiling))
        except Exception as exc:  # a tiling too large for shared memory
            print(f"{M} {name} {tiling}: {type(exc).__name__}")
            continue
        if t < best[0]:
            best = (t, tiling, float((out.float() - ref.float()).abs().max()))
    flops = 2 * M * k_in * n_out
    rows = [
        f"| {M} | {name} | {t_ref:.1f} | {flops / t_ref / 1e6:.0f} | {best[0]:.1f} | {best[1]} | "
        f"{best[0] / t_ref:.2f} | {best[2]:.3f} |"
    ]
    chosen = best[1]
    if name == "fc1" and chosen is not None and chosen[5] == 1:  # GELU in the epilogue against cuBLAS + GELU
        t_sep = _bench(lambda: F.gelu(F.linear(x, w, b)))
        t_fused = _bench(partial(triton_linear, x, w, b, chosen, gelu=True))
        diff = float((triton_linear(x, w, b, chosen, gelu=True).float() - F.gelu(ref).float()).abs().max())
        rows.append(
            f"| {M} | fc1 + GELU | {t_sep:.1f} | | {t_fused:.1f} | {chosen} | {t_fused / t_sep:.2f} | {diff:.3f} |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1280, 6912])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    lines = [
        f"# GEMMs of ViT-B/16's blocks, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}",
        "",
        "| rows | product | cuBLAS us | TFLOP/s | best Triton us | tiling (BM, BN, BK, stages, warps, split-K) | "
        "Triton / cuBLAS | max abs diff |",
        "|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for M, (name, (k_in, n_out)) in itertools.product(args.rows, SHAPES.items()):
        rows = measure(M, name, k_in, n_out)
        print("\n".join(rows), flush=True)
        lines += rows
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
