"""The training aggregator's input sequence in one pass each way.

After the iterator's blocks, the fused step holds each glimpse's tokens ``x`` [B, T, P + G, D]: P prefix tokens (the
CLS token and any registers) then G glimpse tokens. The aggregator reads ``[B, P + T*G, D]``: the prefix tokens
averaged over the T glimpses, then every glimpse's G tokens in glimpse order. As PyTorch ops that is a mean, a copy
(the reshape of a strided slice) and a concatenation forward, and, backward, two zero-filled copies into slices of
x's shape, a divide and an add. Here one Triton pass writes the sequence (a prefix row sums its T tokens in fp32 and
divides by T, rounded once, as PyTorch's mean; the others are copies), and one pass over its gradient writes x's
gradient whole (the prefix rows' gradient divided by T, rounded once; the glimpse rows' copied back). Where Triton
cannot run, those ops.

Shapes: B batch, T glimpses, P prefix tokens, G tokens per glimpse, S = P + T*G, D the width.
"""

from __future__ import annotations

from typing import Any

import torch

from avex.kernel_fallback import _device_may_run, triton
from avex.layer_norm import _row_blocks
from avex.train.kernels import _works

if triton is not None:
    import triton.language as tl

__all__ = ["aggregator_input"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the kernels' fp32 sum suits these; others take the ops

if triton is not None:

    @triton.jit
    def _aggregator_input_fwd_kernel(
        x_ptr,
        out_ptr,
        R,
        S,
        T,
        P,
        G,
        D,
        COPIERS,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        T_CHUNKS: tl.constexpr,
    ):
        # Two kinds of program. The first COPIERS take BLOCK_M each of the R = B * T * G glimpse rows: glimpse row
        # (b, t, k) is x[b, t, P + k] and output row b * S + P + t * G + k. Each other program takes one prefix row
        # (b, p) = divmod(pid - COPIERS, P): the fp32 sum of x[b, :, p] over a [BLOCK_T, BLOCK_N] tile of glimpses,
        # T_CHUNKS tiles, divided by T. A tile, not a loop over the glimpses one by one: the loads go out together
        # (a loop's latency per glimpse made the kernel slower than PyTorch's ops on an H200), and its compile-time
        # trip count suits Triton's interpreter, which cannot loop over a runtime bound.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        in_cols = cols < D
        if pid < COPIERS:
            rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            in_rows = rows < R
            # Row indices in int32 (fewer than 2**31 rows; 64-bit division is slow), offsets in int64: rows x D
            # passes 2**31 at large batches. G >= 1 wherever there are copiers.
            bt, k = rows // G, rows % G
            b = bt // T
            src = (bt * (P + G) + P + k).to(tl.int64)
            dst = (b * S + P + (bt - b * T) * G + k).to(tl.int64)
            mask = in_rows[:, None] & in_cols[None, :]
            g = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0.0)
            tl.store(out_ptr + dst[:, None] * D + cols[None, :], g, mask=mask)  # x's dtype: bit for bit
        else:
            # Names apart from the other branch's: Triton takes a name set in both branches for the if's result.
            r = pid - COPIERS
            canvas, p = r // P, r % P
            ts = tl.arange(0, BLOCK_T)
            acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            for c in range(T_CHUNKS):
                t = c * BLOCK_T + ts
                offs = ((canvas * T + t) * (P + G) + p).to(tl.int64)[:, None] * D + cols[None, :]
                acc += tl.load(x_ptr + offs, mask=(t < T)[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
            # div_rn, the quotient rounded once: Triton's `/` on fp32 is an approximate divide on CUDA. T * 1.0,
            # not T.to(): Triton passes an integer argument equal to 1 as a constant.
            mean = tl.math.div_rn(tl.sum(acc, axis=0), T * 1.0)
            dst_row = (canvas * S + p).to(tl.int64)
            tl.store(out_ptr + dst_row * D + cols, mean.to(out_ptr.dtype.element_ty), mask=in_cols)

    @triton.jit
    def _aggregator_input_bwd_kernel(
        dout_ptr,
        dx_ptr,
        R,
        S,
        T,
        P,
        G,
        D,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # BLOCK_M of the R = B * T * (P + G) rows of the contiguous [B, T, P + G, D] gradient of x per program: row
        # (b, t, j) is dout[b, j] / T (j < P, every glimpse's share of the mean) or dout[b, P + t * G + j - P].
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < R, cols < D
        bt, j = rows // (P + G), rows % (P + G)  # row indices in int32, offsets in int64, as the forward
        b, t = bt // T, bt % T
        is_pre = j < P
        src = tl.where(is_pre, b * S + j, b * S + P + t * G + j - P).to(tl.int64)
        mask = in_rows[:, None] & in_cols[None, :]
        g = tl.load(dout_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0.0)
        share = tl.math.div_rn(g.to(tl.float32), T * 1.0).to(g.dtype)  # as the forward's mean
        dst = rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(dx_ptr + dst, tl.where(is_pre[:, None], share, g), mask=mask)


class _AggregatorInput(torch.autograd.Function):
    """:func:`aggregator_input` by the Triton kernels."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n_prefix: int) -> torch.Tensor:
        x = x.contiguous()
        b, t, pg, d = x.shape
        s = n_prefix + t * (pg - n_prefix)
        out = x.new_empty(b, s, d)
        if out.numel():
            block_n, block_m = _row_blocks(d, 4096)
            block_t = min(triton.next_power_of_2(max(t, 1)), max(1, 4096 // block_n))  # a tile of about 4096
            rows = b * t * (pg - n_prefix)
            copiers = triton.cdiv(rows, block_m)
            _aggregator_input_fwd_kernel[(copiers + b * n_prefix,)](
                x,
                out,
                rows,
                s,
                t,
                n_prefix,
                pg - n_prefix,
                d,
                copiers,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                BLOCK_T=block_t,
                T_CHUNKS=triton.cdiv(t, block_t),
            )
        ctx.x_shape, ctx.n_prefix = x.shape, n_prefix
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, t, pg, d = ctx.x_shape
        dout = dout.contiguous()
        dx = dout.new_empty(b, t, pg, d)  # every element written by the kernel
        if dx.numel():
            block_n, block_m = _row_blocks(d, 4096)
            rows = b * t * pg
            _aggregator_input_bwd_kernel[(triton.cdiv(rows, block_m),)](
                dout, dx, rows, dout.shape[1], t, ctx.n_prefix, pg - ctx.n_prefix, d, BLOCK_M=block_m, BLOCK_N=block_n
            )
        return dx, None


def aggregator_input(x: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """The aggregator's input ``[mean over T of the prefix tokens, every glimpse's tokens]`` with autograd (x's
    gradient), by one Triton pass each way on CUDA (or Triton's interpreter), PyTorch's ops elsewhere.

    Args:
        x: [B, T, P + G, D] each glimpse's tokens after the iterator, the P prefix tokens first (bf16, fp16 or fp32
            for the kernels).
        n_prefix: P, 0 <= P <= P + G.

    Returns:
        [B, P + T*G, D] in x's dtype: rows ``p < P`` the mean of ``x[:, :, p]`` over T (an fp32 sum divided by T,
        rounded once), then row ``P + t*G + k`` = ``x[:, t, P + k]``.
    """
    if x.dim() != 4:
        raise ValueError(f"aggregator_input: x must be 4-D [B, T, P + G, D], got shape {tuple(x.shape)}")
    if not 0 <= n_prefix <= x.shape[2]:
        raise ValueError(
            f"aggregator_input: n_prefix must be in 0..{x.shape[2]} (x's tokens per glimpse, P + G), got {n_prefix}"
        )
    if _device_may_run(x) and x.dtype in _DTYPES and _works("aggregator input", x, _aggregator_input_trial):
        out: torch.Tensor = _AggregatorInput.apply(x, n_prefix)
        return out
    return _aggregator_input_torch(x, n_prefix)


def _aggregator_input_torch(x: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """What the kernels compute, by PyTorch's ops (the fused step's expression before them)."""
    b = x.shape[0]
    return torch.cat([x[:, :, :n_prefix].mean(dim=1), x[:, :, n_prefix:].reshape(b, -1, x.shape[-1])], dim=1)


def _aggregator_input_trial(x: torch.Tensor) -> torch.Tensor:
    # x [2, 5, 48] as B=1, T=2 glimpses of one prefix and 4 glimpse tokens: both kinds of program run.
    return _AggregatorInput.apply(x.view(1, 2, 5, 48), 1)
