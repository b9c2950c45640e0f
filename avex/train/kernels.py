"""Training kernels: self-attention on TORE's short sequences with a backward, and a layer norm backward.

A training step attends over thousands of short rows: the iterator's ``P + G`` tokens per glimpse (5 for a
CLS token and a 2x2 glimpse) and the aggregator's ``P + T*G``. PyTorch's fused attention kernels pay a large
fixed cost per (row, head) on such rows, forward and backward. :func:`train_attention` runs them through
:func:`avex.attention.short_attention` forward and :func:`short_attention_backward` backward (one program per
(row, head), the whole row in registers, the softmax recomputed rather than stored), and anything longer,
masked or on a device without the kernel through PyTorch's SDPA.

:func:`train_layer_norm` is PyTorch's layer norm forward with a Triton backward: PyTorch's own computes the
weight and bias gradients in a separate kernel that spreads a reduction over ~100k rows across few blocks (an
eighth of the memory bandwidth on an H200); here one pass over the rows gives the input gradient and per-program
partial sums of the other two.

Shapes: B rows, S tokens, H heads, Dh head width, ``qkv`` [B, S, 3*H*Dh] with its last axis ordered (3, H, Dh);
M rows and N features of a layer norm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from avex.attention import _KERNEL_DTYPES, _check_qkv, _interpreted, triton

if triton is not None:
    import triton.language as tl

    from avex.attention import _dot, _short_attention_kernel

__all__ = [
    "SDPA_BACKENDS",
    "TRAIN_SHORT",
    "column_sum",
    "layer_norm_backward",
    "short_attention_backward",
    "short_attention_forward",
    "short_kernel_applies",
    "train_attention",
    "train_layer_norm",
    "train_linear",
]

TRAIN_SHORT = 64  # tokens: up to this many, train_attention takes the Triton kernels (forward and backward)
_MAX_TOKENS = 128  # the most the kernels take (one program holds a row's whole sequence in registers)
_WARPS = {16: 1, 32: 2, 64: 4, 128: 8}  # padded length -> warps per program (fwd+bwd timed on an H200 at 16, 64)

# SDPA's backends for the rows the kernel does not take, in this order: flash, then memory-efficient (fp32), then
# math. cuDNN is left out: it is not known to be safe inside a CUDA graph capture.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


if triton is not None:

    @triton.jit
    def _short_attention_bwd_kernel(
        qkv_ptr,
        dout_ptr,
        dqkv_ptr,
        seq_len,
        scale,
        stride_qkv_b,
        stride_qkv_s,
        stride_do_b,
        stride_do_s,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program = one (row b, head h), as the forward kernel. dqkv has qkv's layout and strides.
        pid = tl.program_id(0)
        b = (pid // HEADS).to(tl.int64)
        h = pid % HEADS
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, HEAD_DIM)
        in_seq = s < seq_len
        offs = b * stride_qkv_b + s[:, None] * stride_qkv_s + h * HEAD_DIM + d[None, :]
        q = tl.load(qkv_ptr + offs, mask=in_seq[:, None], other=0.0)
        k = tl.load(qkv_ptr + offs + HEADS * HEAD_DIM, mask=in_seq[:, None], other=0.0)
        v = tl.load(qkv_ptr + offs + 2 * HEADS * HEAD_DIM, mask=in_seq[:, None], other=0.0)
        do_offs = b * stride_do_b + s[:, None] * stride_do_s + h * HEAD_DIM + d[None, :]
        do = tl.load(dout_ptr + do_offs, mask=in_seq[:, None], other=0.0)
        # The forward's probabilities again (cheaper than storing them for rows this short).
        scores = _dot(q, tl.trans(k), IEEE) * scale
        scores = tl.where(in_seq[None, :], scores, float("-inf"))
        p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        # Softmax backward: dS = P * (dP - rowsum(P * dP)), in fp32. Padded query rows have dO = 0, so dS = 0.
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        dq = _dot(ds.to(k.dtype), k, IEEE) * scale
        dk = _dot(tl.trans(ds).to(q.dtype), q, IEEE) * scale
        dv = _dot(tl.trans(p).to(do.dtype), do, IEEE)
        ty = dqkv_ptr.dtype.element_ty
        tl.store(dqkv_ptr + offs, dq.to(ty), mask=in_seq[:, None])
        tl.store(dqkv_ptr + offs + HEADS * HEAD_DIM, dk.to(ty), mask=in_seq[:, None])
        tl.store(dqkv_ptr + offs + 2 * HEADS * HEAD_DIM, dv.to(ty), mask=in_seq[:, None])

    @triton.jit
    def _layer_norm_bwd_kernel(
        x_ptr,
        dy_ptr,
        w_ptr,
        mean_ptr,
        rstd_ptr,
        dx_ptr,
        partial_ptr,
        M,
        N,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CHUNKS: tl.constexpr,
    ):
        # Program p takes rows [p * CHUNKS * BLOCK_M, (p + 1) * CHUNKS * BLOCK_M) of the contiguous [M, N] tensors,
        # BLOCK_M at a time, and keeps its own fp32 sums of dy * xhat and dy, written to partial[p, 0 or 1, :].
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        in_cols = cols < N
        w = tl.load(w_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(CHUNKS):
            rows = (pid * CHUNKS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            in_rows = rows < M
            mask = in_rows[:, None] & in_cols[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=in_rows, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=in_rows, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = w[None, :] * dy
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(partial_ptr + pid * 2 * N + cols, dw, mask=in_cols)
        tl.store(partial_ptr + pid * 2 * N + N + cols, db, mask=in_cols)

    @triton.jit
    def _column_sum_kernel(
        x_ptr, partial_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr
    ):
        # partial[p, :] = fp32 sum of rows [p * CHUNKS * BLOCK_M, (p + 1) * CHUNKS * BLOCK_M) of x [M, N].
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        in_cols = cols < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(CHUNKS):
            rows = (pid * CHUNKS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & in_cols[None, :]
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(x.to(tl.float32), axis=0)
        tl.store(partial_ptr + pid * N + cols, acc, mask=in_cols)


def _train_refusal(seq_len: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the training kernels cannot take this shape or dtype, or None when they can."""
    if not 1 <= seq_len <= _MAX_TOKENS:
        return f"the training attention kernels take 1..{_MAX_TOKENS} tokens, got {seq_len}"
    if head_dim < 16 or head_dim & (head_dim - 1) or dtype not in _KERNEL_DTYPES:
        return f"they need a head width that is a power of two >= 16 and fp16/bf16/fp32, got Dh={head_dim}, {dtype}"
    return None


def _checked(qkv: torch.Tensor, heads: int) -> tuple[int, int, int, int]:
    """(B, S, Dh, padded length) of a qkv the kernels take; ValueError otherwise."""
    if triton is None:
        raise RuntimeError("the training attention kernels need Triton (it ships with PyTorch's CUDA wheels)")
    b, s, hd = _check_qkv(qkv, heads, None)
    refusal = _train_refusal(s, hd, qkv.dtype)
    if refusal:
        raise ValueError(refusal)
    return b, s, hd, max(16, triton.next_power_of_2(s))


def short_attention_forward(qkv: torch.Tensor, heads: int, *, num_warps: int | None = None) -> torch.Tensor:
    """Softmax attention of every (row, head) of ``qkv``, every key valid, by :mod:`avex.attention`'s kernel
    (here up to 128 tokens).

    Args:
        qkv: [B, S, 3*H*Dh] (S <= 128, Dh a power of two >= 16; fp16, bf16 or fp32).
        num_warps: warps per program (None: by the padded length).

    Returns:
        [B, S, H*Dh] in qkv's dtype.
    """
    b, s, hd, block_s = _checked(qkv, heads)
    qkv = qkv.contiguous()
    out = torch.empty(b, s, heads * hd, device=qkv.device, dtype=qkv.dtype)
    _short_attention_kernel[(b * heads,)](
        qkv, out, out, s, hd**-0.5, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), 0,
        HEADS=heads, HEAD_DIM=hd, BLOCK_S=block_s, HAS_VALID=False, IEEE=qkv.dtype == torch.float32,
        num_warps=num_warps or _WARPS[block_s],
    )  # fmt: skip
    return out


def short_attention_backward(
    qkv: torch.Tensor, dout: torch.Tensor, heads: int, *, num_warps: int | None = None
) -> torch.Tensor:
    """The gradient of :func:`short_attention_forward` with respect to ``qkv``.

    Args:
        qkv: [B, S, 3*H*Dh] the forward's input (S <= 128, Dh a power of two >= 16; fp16, bf16 or fp32).
        dout: [B, S, H*Dh] the gradient of its output.
        heads: H.
        num_warps: warps per program (None: by the padded length).

    Returns:
        dqkv [B, S, 3*H*Dh] in qkv's dtype, contiguous.
    """
    b, s, hd, block_s = _checked(qkv, heads)
    if dout.shape != (b, s, heads * hd) or dout.dtype != qkv.dtype:
        raise ValueError(f"dout must be {qkv.dtype} [{b}, {s}, {heads * hd}], got {dout.dtype} {tuple(dout.shape)}")
    qkv, dout = qkv.contiguous(), dout.contiguous()
    dqkv = torch.empty_like(qkv)
    _short_attention_bwd_kernel[(b * heads,)](
        qkv, dout, dqkv, s, hd**-0.5, qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1),
        HEADS=heads, HEAD_DIM=hd, BLOCK_S=block_s, IEEE=qkv.dtype == torch.float32,
        num_warps=num_warps or _WARPS[block_s],
    )  # fmt: skip
    return dqkv


_LN_ROWS = 64  # rows per program of the layer norm backward: few enough programs that their partial sums are small


def layer_norm_backward(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of a layer norm over the last axis, by one Triton pass over the rows.

    Args:
        x, dy: [..., N] the forward's input and the output's gradient (same dtype).
        weight: [N]. mean, rstd: fp32, one per row (``torch.native_layer_norm``'s second and third outputs).

    Returns:
        dx like ``x``; dweight and dbias [N] in ``weight``'s dtype (summed over the rows in fp32).
    """
    if triton is None:
        raise RuntimeError("layer_norm_backward needs Triton (it ships with PyTorch's CUDA wheels)")
    n = x.shape[-1]
    x2, dy2 = x.reshape(-1, n).contiguous(), dy.reshape(-1, n).contiguous()
    m = x2.shape[0]
    block_n, block_m = _row_blocks(n)
    programs = triton.cdiv(m, _LN_ROWS)
    dx = torch.empty_like(x2)
    partial = torch.empty(programs, 2, n, dtype=torch.float32, device=x.device)
    _layer_norm_bwd_kernel[(programs,)](
        x2, dy2, weight, mean.reshape(-1), rstd.reshape(-1), dx, partial, m, n,
        BLOCK_M=block_m, BLOCK_N=block_n, CHUNKS=_LN_ROWS // block_m,
    )  # fmt: skip
    sums = partial.sum(dim=0).to(weight.dtype)
    return dx.view(x.shape), sums[0], sums[1]


def _row_blocks(n: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M) of the row-walking kernels: a tile of at most 2048 elements."""
    block_n = triton.next_power_of_2(n)
    return block_n, max(1, min(_LN_ROWS, 2048 // block_n))


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """fp32 sums over the rows of a contiguous [M, N] tensor, in x's dtype: a bias gradient, in one Triton pass
    and a small second sum (PyTorch's own column reduction reads such tensors at a third of the bandwidth)."""
    m, n = x.shape
    block_n, block_m = _row_blocks(n)
    programs = triton.cdiv(m, _LN_ROWS)
    partial = torch.empty(programs, n, dtype=torch.float32, device=x.device)
    _column_sum_kernel[(programs,)](x, partial, m, n, BLOCK_M=block_m, BLOCK_N=block_n, CHUNKS=_LN_ROWS // block_m)
    return partial.sum(dim=0).to(x.dtype)


class _Linear(torch.autograd.Function):
    """``F.linear`` with a bias; backward: two matrix products and :func:`column_sum` for the bias."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = (dy2 @ weight).view(x.shape) if ctx.needs_input_grad[0] else None  # pixels need none
        dw = dy2.t() @ x.reshape(-1, x.shape[-1])
        return dx, dw, column_sum(dy2)


def train_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with autograd; its bias gradient by :func:`column_sum` on CUDA (or Triton's
    interpreter)."""
    if triton is not None and (x.is_cuda or _interpreted()) and x.dtype == weight.dtype == bias.dtype:
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class _LayerNorm(torch.autograd.Function):
    """PyTorch's layer norm forward; :func:`layer_norm_backward` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        return (*layer_norm_backward(x, dy, weight, mean, rstd), None)


def train_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Layer norm over the last axis with autograd; the Triton backward on CUDA (or Triton's interpreter)."""
    if triton is not None and (x.is_cuda or _interpreted()) and x.dtype == weight.dtype:
        return _LayerNorm.apply(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class _ShortAttention(torch.autograd.Function):
    """short_attention_forward forward, short_attention_backward backward (saves only ``qkv``)."""

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        qkv = qkv.contiguous()
        ctx.save_for_backward(qkv)
        ctx.heads = heads
        return short_attention_forward(qkv, heads)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, None]:
        (qkv,) = ctx.saved_tensors
        return short_attention_backward(qkv, dout, ctx.heads), None


def short_kernel_applies(qkv: torch.Tensor, heads: int) -> bool:
    """Whether :func:`train_attention` takes the Triton kernels for ``qkv`` (CUDA or Triton's interpreter, at most
    :data:`TRAIN_SHORT` tokens, a head width and dtype the kernels take)."""
    if triton is None or not (qkv.is_cuda or _interpreted()):
        return False
    b, s, hd = _check_qkv(qkv, heads, None)
    return s <= TRAIN_SHORT and _train_refusal(s, hd, qkv.dtype) is None


def train_attention(qkv: torch.Tensor, heads: int, first_query: int = 0) -> torch.Tensor:
    """Softmax self-attention with autograd, every key valid, from the rows ``first_query:`` on.

    Args:
        qkv: [B, S, 3*H*Dh] (timm's and the decoder's qkv projection output).
        heads: H.
        first_query: rows before it are keys only.

    Returns:
        [B, S - first_query, H*Dh], heads side by side (the output projection's input).
    """
    if first_query == 0 and short_kernel_applies(qkv, heads):
        return _ShortAttention.apply(qkv, heads)
    b, s, hd = _check_qkv(qkv, heads, None)
    q, k, v = qkv.view(b, s, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(q[:, :, first_query:], k, v)  # [B, H, S', Dh]
    return out.transpose(1, 2).reshape(b, s - first_query, heads * hd)
