"""Training's MLP branch, ``fc2(gelu(fc1(x)))`` without fc2's bias, with the exact GELU in the products' epilogues.

A block's MLP widens ~100k rows of D features to 4D and back. As cuBLAS and PyTorch ops its 4D-wide tensors are
each written and read again by a separate pass: forward, fc1 writes the pre-activation and the GELU reads it to
write h; backward, fc2's input gradient dh is written, the GELU backward reads it with the pre-activation to write
dpre, and fc1's bias gradient reads dpre once more. Those passes took about 2.3 ms of an 11 ms training step on an
H200 (``benchmarks/RESULTS.md`` section 7.1). Here one Triton product computes fc1 with its bias and writes both
the pre-activation (for the backward) and h; and one computes ``dpre = (dy @ W2) * gelu'(pre)`` with the
column sums of dpre per program in fp32 (fc1's bias gradient, summed once by
:func:`~avex.train.rows.sum_partials`), so dh is never written. The products over 4D (fc2 forward, the weight
gradients, the input gradient) stay with cuBLAS. Where Triton cannot run the branch is PyTorch's ops.

Shapes: M rows, D features (the residual width, K of the products), F = fc1's outputs (4D in a ViT).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from avex.kernel_fallback import _device_may_run, triton
from avex.train.kernels import _works
from avex.train.rows import sum_partials, train_linear

if triton is not None:
    import triton.language as tl

    from avex.attention import _dot  # fp32 inputs get IEEE products, as the eager step's fp32 matmuls

__all__ = ["MLP_LAUNCH", "MlpLaunch", "fc1_gelu", "gelu_input_grad", "train_mlp"]


if triton is not None:

    @triton.jit
    def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Program pid's rows and columns of an [M, N] output: a row block's column tiles run one after another,
        # so that its [BLOCK_M, K] input tile is read from L2 after the first.
        n_tiles = tl.cdiv(N, BLOCK_N)
        rows = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        return rows, cols, rows < M, cols < N

    @triton.jit
    def _fc1_gelu_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        pre_ptr,
        h_ptr,
        M,
        N,
        K,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_STEPS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # pre = x @ w^T + b and h = gelu(pre) over one tile; x [M, K], w [N, K] (a Linear's weight), row-major.
        rows, cols, in_rows, in_cols = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(K_STEPS):  # a constexpr count: Triton's interpreter takes no runtime bound
            k0 = kb * BLOCK_K
            in_k = k0 + ks < K
            a = tl.load(
                x_ptr + rows.to(tl.int64)[:, None] * K + (k0 + ks)[None, :],
                mask=in_rows[:, None] & in_k[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + cols[None, :] * K + (k0 + ks)[:, None], mask=in_k[:, None] & in_cols[None, :], other=0.0
            )
            acc += _dot(a, b, IEEE)
        acc += tl.load(b_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = in_rows[:, None] & in_cols[None, :]
        pre = acc.to(pre_ptr.dtype.element_ty)  # rounded once, as cuBLAS's bias epilogue rounds it
        tl.store(pre_ptr + offs, pre, mask=mask)
        p = pre.to(tl.float32)  # the GELU of the stored value, which the backward reads
        tl.store(
            h_ptr + offs, (0.5 * p * (1.0 + tl.math.erf(p * 0.7071067811865476))).to(h_ptr.dtype.element_ty), mask=mask
        )

    @triton.jit
    def _gelu_grad_kernel(
        dy_ptr,
        w_ptr,
        pre_ptr,
        dpre_ptr,
        partial_ptr,
        M,
        N,
        K,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        K_STEPS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # dpre = (dy @ w) * gelu'(pre) over one tile, dy [M, K] (fc2's output gradient), w [K, N] (fc2's weight),
        # pre [M, N]; partial[row block, cols] = the fp32 column sums of the tile's dpre as stored.
        pid = tl.program_id(0)
        rows, cols, in_rows, in_cols = _tile(pid, M, N, BLOCK_M, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(K_STEPS):  # a constexpr count: Triton's interpreter takes no runtime bound
            k0 = kb * BLOCK_K
            in_k = k0 + ks < K
            a = tl.load(
                dy_ptr + rows.to(tl.int64)[:, None] * K + (k0 + ks)[None, :],
                mask=in_rows[:, None] & in_k[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + (k0 + ks)[:, None] * N + cols[None, :], mask=in_k[:, None] & in_cols[None, :], other=0.0
            )
            acc += _dot(a, b, IEEE)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = in_rows[:, None] & in_cols[None, :]
        p = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        slope = 0.5 * (1.0 + tl.math.erf(p * 0.7071067811865476)) + p * tl.exp(-0.5 * p * p) * 0.3989422804014327
        dpre = (acc * slope).to(dpre_ptr.dtype.element_ty)  # rows past M are 0 (dy's masked loads)
        tl.store(dpre_ptr + offs, dpre, mask=mask)
        tl.store(
            partial_ptr + (pid // tl.cdiv(N, BLOCK_N)) * N + cols, tl.sum(dpre.to(tl.float32), axis=0), mask=in_cols
        )


class MlpLaunch(NamedTuple):
    """Launch settings of the two products: an output tile of block_m x block_n, K in steps of block_k."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# By kernel; timed against cuBLAS plus PyTorch's GELU by benchmarks/mlp_sweep.py.
MLP_LAUNCH: dict[str, MlpLaunch] = {
    "fc1_gelu": MlpLaunch(128, 128, 64, 8, 3),
    "gelu_grad": MlpLaunch(128, 128, 64, 8, 3),
}


def _launch(kernel: str, m: int, n: int, k: int, dtype: torch.dtype) -> tuple[tuple[int], dict[str, Any]]:
    s = MLP_LAUNCH[kernel]
    grid = (triton.cdiv(m, s.block_m) * triton.cdiv(n, s.block_n),)
    kw = dict(
        BLOCK_M=s.block_m,
        BLOCK_N=s.block_n,
        BLOCK_K=s.block_k,
        K_STEPS=triton.cdiv(k, s.block_k),
        IEEE=dtype == torch.float32,
    )
    return grid, dict(kw, num_warps=s.num_warps, num_stages=s.num_stages)


def fc1_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, h): pre = x @ weight^T + bias and h = gelu(pre) (exact GELU of pre as rounded to x's dtype), each
    [M, F] in x's dtype, from x [M, D] contiguous, weight [F, D], bias [F]; one Triton product."""
    m, k = x.shape
    n = weight.shape[0]
    pre, h = (torch.empty(m, n, dtype=x.dtype, device=x.device) for _ in range(2))
    if m:
        grid, kw = _launch("fc1_gelu", m, n, k, x.dtype)
        _fc1_gelu_kernel[grid](x, weight.contiguous(), bias, pre, h, m, n, k, **kw)
    return pre, h


def gelu_input_grad(dy: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dpre [M, F], dbias [F]): the gradient of fc1's output through the GELU, ``(dy @ weight) * gelu'(pre)``, and
    its column sums (fc1's bias gradient; fp32 per program, rounded once), from dy [M, D] contiguous (fc2's output
    gradient), weight [D, F] (fc2's), pre [M, F] (:func:`fc1_gelu`'s); one Triton product and one small sum."""
    m, k = dy.shape
    n = weight.shape[1]
    dpre = torch.empty(m, n, dtype=dy.dtype, device=dy.device)
    s = MLP_LAUNCH["gelu_grad"]
    partial = torch.empty(triton.cdiv(m, s.block_m), n, dtype=torch.float32, device=dy.device)
    if m:
        grid, kw = _launch("gelu_grad", m, n, k, dy.dtype)
        _gelu_grad_kernel[grid](dy, weight.contiguous(), pre, dpre, partial, m, n, k, **kw)
    return dpre, sum_partials(partial, dy.dtype)


class _Mlp(torch.autograd.Function):
    """:func:`train_mlp` with the two Triton products; cuBLAS for fc2 and the backward's other products."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        pre, h = fc1_gelu(x2, w1, b1)
        ctx.save_for_backward(x2, w1, w2, pre, h)
        ctx.x_shape = x.shape
        return F.linear(h, w2).view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        x2, w1, w2, pre, h = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dw2 = dy2.t() @ h
        dpre, db1 = gelu_input_grad(dy2, w2, pre)
        dx = (dpre @ w1).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, dpre.t() @ x2, db1, dw2


def _mlp_torch(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(train_linear(x, w1, b1)), w2)


def train_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """A block's MLP branch without fc2's bias (the residual add that follows adds it): ``F.linear(gelu(F.linear(x,
    w1, b1)), w2)`` with the exact GELU and autograd; its GELU inside two Triton products on CUDA (or Triton's
    interpreter), PyTorch's ops elsewhere.

    Args:
        x: [..., D]. w1: [F, D] and b1: [F], fc1's weight and bias. w2: [D2, F], fc2's weight.

    Returns:
        [..., D2] in x's dtype (fp32 accumulation; the pre-activation rounded to x's dtype before the GELU, as
        PyTorch's ops round it).
    """
    if _device_may_run(x) and x.dtype == w1.dtype == b1.dtype == w2.dtype and _works("mlp", x, _mlp_trial):
        out: torch.Tensor = _Mlp.apply(x, w1, b1, w2)
        return out
    return _mlp_torch(x, w1, b1, w2)


def _mlp_trial(x: torch.Tensor) -> torch.Tensor:
    w1 = torch.ones(16, 48, device=x.device, dtype=x.dtype, requires_grad=True)
    w2 = torch.ones(8, 16, device=x.device, dtype=x.dtype, requires_grad=True)
    return _Mlp.apply(x, w1, torch.zeros(16, device=x.device, dtype=x.dtype, requires_grad=True), w2)
