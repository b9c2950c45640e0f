"""Self-attention for training on TORE's short sequences: the Triton kernel of :mod:`avex.attention` with a backward.

A training step attends over thousands of short rows: the iterator's ``P + G`` tokens per glimpse (5 for a
CLS token and a 2x2 glimpse) and the aggregator's ``P + T*G``. PyTorch's fused attention kernels pay a large
fixed cost per (row, head) on such rows, forward and backward. :func:`train_attention` runs them through
:func:`avex.attention.short_attention` forward and :func:`short_attention_backward` backward (one program per
(row, head), the whole row in registers, the softmax recomputed rather than stored), and anything longer,
masked or on a device without the kernel through PyTorch's SDPA.

Shapes: B rows, S tokens, H heads, Dh head width, ``qkv`` [B, S, 3*H*Dh] with its last axis ordered (3, H, Dh).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from avex.attention import _check_qkv, _interpreted, _kernel_refusal, _launch, short_attention, triton

if triton is not None:
    import triton.language as tl

    from avex.attention import _dot

__all__ = ["SDPA_BACKENDS", "short_attention_backward", "short_kernel_applies", "train_attention"]

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


def short_attention_backward(
    qkv: torch.Tensor, dout: torch.Tensor, heads: int, *, num_warps: int | None = None
) -> torch.Tensor:
    """The gradient of :func:`avex.attention.short_attention` (no key mask) with respect to ``qkv``.

    Args:
        qkv: [B, S, 3*H*Dh] the forward's input (S <= 64, Dh a power of two >= 16; fp16, bf16 or fp32).
        dout: [B, S, H*Dh] the gradient of its output.
        heads: H.
        num_warps: warps per program (None: 1 up to 16 tokens, else 4).

    Returns:
        dqkv [B, S, 3*H*Dh] in qkv's dtype, contiguous.
    """
    if triton is None:
        raise RuntimeError("short_attention_backward needs Triton (it ships with PyTorch's CUDA wheels)")
    b, s, hd = _check_qkv(qkv, heads, None)
    refusal = _kernel_refusal(s, hd, qkv.dtype)
    if refusal:
        raise ValueError(refusal)
    if dout.shape != (b, s, heads * hd) or dout.dtype != qkv.dtype:
        raise ValueError(f"dout must be {qkv.dtype} [{b}, {s}, {heads * hd}], got {dout.dtype} {tuple(dout.shape)}")
    qkv, dout = qkv.contiguous(), dout.contiguous()
    dqkv = torch.empty_like(qkv)
    block_s = _launch(s)[0]
    _short_attention_bwd_kernel[(b * heads,)](
        qkv,
        dout,
        dqkv,
        s,
        hd**-0.5,
        qkv.stride(0),
        qkv.stride(1),
        dout.stride(0),
        dout.stride(1),
        HEADS=heads,
        HEAD_DIM=hd,
        BLOCK_S=block_s,
        IEEE=qkv.dtype == torch.float32,
        num_warps=num_warps or (1 if block_s <= 16 else 4),
    )
    return dqkv


class _ShortAttention(torch.autograd.Function):
    """short_attention forward, short_attention_backward backward (saves only ``qkv``)."""

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        qkv = qkv.contiguous()
        ctx.save_for_backward(qkv)
        ctx.heads = heads
        return short_attention(qkv, heads)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, None]:
        (qkv,) = ctx.saved_tensors
        return short_attention_backward(qkv, dout, ctx.heads), None


def short_kernel_applies(qkv: torch.Tensor, heads: int) -> bool:
    """Whether :func:`train_attention` takes the Triton kernels for ``qkv`` (CUDA or Triton's interpreter, a
    short sequence, a head width and dtype the kernel takes)."""
    if triton is None or not (qkv.is_cuda or _interpreted()):
        return False
    b, s, hd = _check_qkv(qkv, heads, None)
    return _kernel_refusal(s, hd, qkv.dtype) is None


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
