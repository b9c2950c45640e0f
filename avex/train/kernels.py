"""Self-attention for training on TORE's short sequences: the Triton kernel of :mod:`avex.attention` with a backward.

A training step attends over thousands of short rows: the iterator's ``P + G`` tokens per glimpse (5 for a
CLS token and a 2x2 glimpse) and the aggregator's ``P + T*G``. PyTorch's fused attention kernels pay a large
fixed cost per (row, head) on such rows, forward and backward. :func:`train_attention` runs them through
:func:`avex.attention.short_attention` forward and :func:`short_attention_backward` backward (one program per
(row, head), the whole row in registers, the softmax recomputed rather than stored) up to :data:`TRAIN_SHORT`
tokens. Rows of up to :data:`TRAIN_BLOCKED` tokens (the aggregator's 1 + 4T at T >= 32), and every call with
``first_query > 0`` (the glimpse decoder's unseen patches over 197 keys), take blockwise kernels in the manner of
FlashAttention-2 (:func:`blocked_attention_forward`, :func:`blocked_attention_backward`: blocks of 64 queries
and keys, online softmax, the log-sum-exp kept for the backward, one program per key block for dK and dV and
one per query block for dQ, so no atomics). Anything longer, or on a device without the kernels, runs through
PyTorch's SDPA.

Shapes: B rows, S tokens, H heads, Dh head width, ``qkv`` [B, S, 3*H*Dh] with its last axis ordered (3, H, Dh);
S_q = S - first_query query rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from avex.attention import _KERNEL_DTYPES, _check_qkv
from avex.kernel_fallback import _device_may_run, triton

if triton is not None:
    import triton.language as tl

    from avex.attention import _dot, _short_attention_kernel

__all__ = [
    "SDPA_BACKENDS",
    "TRAIN_BLOCKED",
    "TRAIN_SHORT",
    "blocked_attention_backward",
    "blocked_attention_forward",
    "blocked_kernel_applies",
    "short_attention_backward",
    "short_attention_forward",
    "short_kernel_applies",
    "train_attention",
]

_MAX_TOKENS = 128  # the most the kernels take (one program holds a row's whole sequence in registers)
# Tokens: up to this many, train_attention takes the Triton kernels (forward and backward). All they take: forward and
# backward on an H200 at 65 to 128 tokens, 2.7-3.2x faster than SDPA's flash kernel (RESULTS.md section 7.1).
TRAIN_SHORT = _MAX_TOKENS
_WARPS = {16: 1, 32: 2, 64: 4, 128: 8}  # padded length -> warps per program (fwd+bwd timed on an H200 at 16, 64)
# The blocked kernels: the most tokens they take (their block counts are compile-time constants, as Triton's
# interpreter needs, so one build per count: the bound is kept to what training attends over), and the default
# query and key block.
_MAX_BLOCKED = 256
# (kernel, head width) -> (block_q, block_k, num_warps, num_stages) of the blocked kernels: the fastest of 73 settings
# for each kernel alone, summed over the decoder's rows (Dh 32: 4 heads, 197 keys) or the aggregator's past 128
# tokens (Dh 64) on an H200 (benchmarks/blocked_sweep.py, RESULTS.md 7.1: dK/dV 1.97x and 1.37x faster than the
# first, untimed 64, 64, 4 warps; the others 1.0-1.12x). Wider heads take Dh 64's.
_BLOCKED_LAUNCH = {
    ("fwd", 32): (64, 32, 2, 3),
    ("fwd", 64): (64, 64, 4, 3),
    ("dkdv", 32): (64, 64, 2, 3),
    ("dkdv", 64): (32, 64, 4, 3),
    ("dq", 32): (64, 32, 4, 3),
    ("dq", 64): (64, 32, 4, 3),
}
# Tokens: above TRAIN_SHORT (or from a first_query > 0) and up to this many, train_attention takes the blocked
# kernels. Not yet timed against SDPA's flash kernel (benchmarks/sdpa_short.py --train).
TRAIN_BLOCKED = _MAX_BLOCKED

# SDPA's backends for the rows the kernel does not take, in this order: flash, then memory-efficient (fp32), then
# math. cuDNN is left out: it is not known to be safe inside a CUDA graph capture.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_LOG2E = 1.0 / math.log(2.0)  # the blocked forward's softmax in base 2 (exp2), its scores scaled by this


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
    def _blocked_attention_fwd_kernel(
        qkv_ptr,
        out_ptr,
        lse_ptr,
        seq_len,
        first_query,
        scale_log2,
        stride_qkv_b,
        stride_qkv_s,
        stride_out_b,
        stride_out_s,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        KEY_BLOCKS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program = one (row b, head h) and BLOCK_Q query rows; the keys in blocks of BLOCK_K, online softmax.
        pid = tl.program_id(0)
        b = (pid // HEADS).to(tl.int64)  # 64-bit offsets: rows x stride can pass 2**31 at large batches
        h = pid % HEADS
        n_q = seq_len - first_query
        rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # query index, 0..S_q-1
        d = tl.arange(0, HEAD_DIM)
        in_q = rows < n_q
        base = qkv_ptr + b * stride_qkv_b + h * HEAD_DIM + d[None, :]  # qkv's last axis is (3, H, Dh)
        q = tl.load(base + (rows + first_query)[:, None] * stride_qkv_s, mask=in_q[:, None], other=0.0)
        m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, HEAD_DIM], dtype=tl.float32)
        # A constexpr trip count: Triton's interpreter cannot loop to a runtime bound.
        for kb in range(KEY_BLOCKS):
            keys = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            in_k = keys < seq_len
            kv = base + keys[:, None] * stride_qkv_s
            k = tl.load(kv + HEADS * HEAD_DIM, mask=in_k[:, None], other=0.0)
            v = tl.load(kv + 2 * HEADS * HEAD_DIM, mask=in_k[:, None], other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * scale_log2  # [BLOCK_Q, BLOCK_K] fp32, log2 units
            s = tl.where(in_k[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is in the first block
            alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        out = out_ptr + b * stride_out_b + rows[:, None] * stride_out_s + h * HEAD_DIM + d[None, :]
        tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=in_q[:, None])
        # The backward's log-sum-exp of the scaled scores, natural log: [B, H, S_q] contiguous.
        tl.store(lse_ptr + pid.to(tl.int64) * n_q + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=in_q)

    @triton.jit
    def _blocked_attention_delta_kernel(
        out_ptr,
        dout_ptr,
        delta_ptr,
        n_q,
        stride_out_b,
        stride_out_s,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_Q: tl.constexpr,
    ):
        # delta = rowsum(dO * O) per (row, head, query), fp32: the softmax backward's per-query term. out and dout
        # share strides (both contiguous [B, S_q, H*Dh]).
        pid = tl.program_id(0)
        b = (pid // HEADS).to(tl.int64)
        h = pid % HEADS
        rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, HEAD_DIM)
        in_q = rows < n_q
        offs = b * stride_out_b + rows[:, None] * stride_out_s + h * HEAD_DIM + d[None, :]
        o = tl.load(out_ptr + offs, mask=in_q[:, None], other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + offs, mask=in_q[:, None], other=0.0).to(tl.float32)
        tl.store(delta_ptr + pid.to(tl.int64) * n_q + rows, tl.sum(o * do, axis=1), mask=in_q)

    @triton.jit
    def _probs_and_dscores(a, b, u, w, lse, delta, valid, scale, IEEE: tl.constexpr):
        """The forward's probabilities again and the scores' gradient, for one tile of the blocked backward.

        Both backward kernels need P = exp(scale * a b^T - lse) and dS = P * (u w^T - delta); the dK/dV kernel in
        transposed tiles ([keys, queries]: a = K, b = Q, u = V, w = dO), the dQ kernel as they are (a = Q, b = K,
        u = dO, w = V). ``lse`` and ``delta`` come broadcast to the tile, ``valid`` masks padded keys and queries
        (P = 0 there). Returns (P, dS), fp32.
        """
        p = tl.where(valid, tl.exp(_dot(a, tl.trans(b), IEEE) * scale - lse), 0.0)
        return p, p * (_dot(u, tl.trans(w), IEEE) - delta)

    @triton.jit
    def _blocked_attention_dkdv_kernel(
        qkv_ptr,
        dout_ptr,
        lse_ptr,
        delta_ptr,
        dqkv_ptr,
        seq_len,
        first_query,
        scale,
        stride_qkv_b,
        stride_qkv_s,
        stride_do_b,
        stride_do_s,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        QUERY_BLOCKS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program = one (row b, head h) and BLOCK_K keys: it alone writes their dK and dV (no atomics), looping
        # over every query block. Transposed tiles ([keys, queries]) so that dV and dK need no further transpose.
        pid = tl.program_id(0)
        b = (pid // HEADS).to(tl.int64)
        h = pid % HEADS
        n_q = seq_len - first_query
        keys = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        d = tl.arange(0, HEAD_DIM)
        in_k = keys < seq_len
        base = qkv_ptr + b * stride_qkv_b + h * HEAD_DIM + d[None, :]
        kv = base + keys[:, None] * stride_qkv_s
        k = tl.load(kv + HEADS * HEAD_DIM, mask=in_k[:, None], other=0.0)
        v = tl.load(kv + 2 * HEADS * HEAD_DIM, mask=in_k[:, None], other=0.0)
        dk = tl.zeros([BLOCK_K, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_K, HEAD_DIM], dtype=tl.float32)
        row_stats = pid.to(tl.int64) * n_q
        for qb in range(QUERY_BLOCKS):
            rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
            in_q = rows < n_q
            q = tl.load(base + (rows + first_query)[:, None] * stride_qkv_s, mask=in_q[:, None], other=0.0)
            do_offs = b * stride_do_b + rows[:, None] * stride_do_s + h * HEAD_DIM + d[None, :]
            do = tl.load(dout_ptr + do_offs, mask=in_q[:, None], other=0.0)
            lse = tl.load(lse_ptr + row_stats + rows, mask=in_q, other=0.0)
            delta = tl.load(delta_ptr + row_stats + rows, mask=in_q, other=0.0)
            # P^T and dS^T [BLOCK_K, BLOCK_Q]; padded keys and queries give 0.
            valid = in_k[:, None] & in_q[None, :]
            p_t, ds_t = _probs_and_dscores(k, q, v, do, lse[None, :], delta[None, :], valid, scale, IEEE)
            dv += _dot(p_t.to(do.dtype), do, IEEE)
            dk += _dot(ds_t.to(q.dtype), q, IEEE)
        ty = dqkv_ptr.dtype.element_ty
        out = dqkv_ptr + b * stride_qkv_b + keys[:, None] * stride_qkv_s + h * HEAD_DIM + d[None, :]
        tl.store(out + HEADS * HEAD_DIM, (dk * scale).to(ty), mask=in_k[:, None])
        tl.store(out + 2 * HEADS * HEAD_DIM, dv.to(ty), mask=in_k[:, None])

    @triton.jit
    def _blocked_attention_dq_kernel(
        qkv_ptr,
        dout_ptr,
        lse_ptr,
        delta_ptr,
        dqkv_ptr,
        seq_len,
        first_query,
        scale,
        stride_qkv_b,
        stride_qkv_s,
        stride_do_b,
        stride_do_s,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        KEY_BLOCKS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program = one (row b, head h) and BLOCK_Q query rows: dQ = sum over key blocks of dS K * scale.
        pid = tl.program_id(0)
        b = (pid // HEADS).to(tl.int64)
        h = pid % HEADS
        n_q = seq_len - first_query
        rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, HEAD_DIM)
        in_q = rows < n_q
        base = qkv_ptr + b * stride_qkv_b + h * HEAD_DIM + d[None, :]
        q_offs = (rows + first_query)[:, None] * stride_qkv_s
        q = tl.load(base + q_offs, mask=in_q[:, None], other=0.0)
        do_offs = b * stride_do_b + rows[:, None] * stride_do_s + h * HEAD_DIM + d[None, :]
        do = tl.load(dout_ptr + do_offs, mask=in_q[:, None], other=0.0)
        lse = tl.load(lse_ptr + pid.to(tl.int64) * n_q + rows, mask=in_q, other=0.0)
        delta = tl.load(delta_ptr + pid.to(tl.int64) * n_q + rows, mask=in_q, other=0.0)
        dq = tl.zeros([BLOCK_Q, HEAD_DIM], dtype=tl.float32)
        for kb in range(KEY_BLOCKS):
            keys = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            in_k = keys < seq_len
            kv = base + keys[:, None] * stride_qkv_s
            k = tl.load(kv + HEADS * HEAD_DIM, mask=in_k[:, None], other=0.0)
            v = tl.load(kv + 2 * HEADS * HEAD_DIM, mask=in_k[:, None], other=0.0)
            # Padded query rows have dO = 0, so dS = 0 there: only the keys are masked.
            _, ds = _probs_and_dscores(q, k, do, v, lse[:, None], delta[:, None], in_k[None, :], scale, IEEE)
            dq += _dot(ds.to(k.dtype), k, IEEE)
        out = dqkv_ptr + b * stride_qkv_b + q_offs + h * HEAD_DIM + d[None, :]
        tl.store(out, (dq * scale).to(dqkv_ptr.dtype.element_ty), mask=in_q[:, None])


def _head_refused(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether both kernel families refuse this head width or dtype (they take powers of two >= 16, fp16/bf16/fp32)."""
    return head_dim < 16 or bool(head_dim & (head_dim - 1)) or dtype not in _KERNEL_DTYPES


def _train_refusal(seq_len: int, head_dim: int, dtype: torch.dtype, first_query: int = 0) -> str | None:
    """Why the register kernels cannot take this shape or dtype, or None when they can (``first_query`` unused:
    the signature of :func:`_checked`'s refusals)."""
    if not 1 <= seq_len <= _MAX_TOKENS:
        return f"the training attention kernels take 1..{_MAX_TOKENS} tokens, got {seq_len}"
    if _head_refused(head_dim, dtype):
        return f"they need a head width that is a power of two >= 16 and fp16/bf16/fp32, got Dh={head_dim}, {dtype}"
    return None


def _checked(
    qkv: torch.Tensor,
    heads: int,
    refusal: Callable[[int, int, torch.dtype, int], str | None] = _train_refusal,
    first_query: int = 0,
) -> tuple[int, int, int]:
    """(B, S, Dh) of a qkv that ``refusal``'s kernels take from ``first_query`` on; ValueError otherwise."""
    if triton is None:
        raise RuntimeError("the training attention kernels need Triton (it ships with PyTorch's CUDA wheels)")
    b, s, hd = _check_qkv(qkv, heads, None)
    why = refusal(s, hd, qkv.dtype, first_query)
    if why:
        raise ValueError(why)
    return b, s, hd


def _padded(s: int) -> int:
    """The register kernels' block: the sequence padded to a power of two >= 16."""
    assert triton is not None
    return max(16, triton.next_power_of_2(s))


def short_attention_forward(qkv: torch.Tensor, heads: int, *, num_warps: int | None = None) -> torch.Tensor:
    """Softmax attention of every (row, head) of ``qkv``, every key valid, by :mod:`avex.attention`'s kernel
    (here up to 128 tokens).

    Args:
        qkv: [B, S, 3*H*Dh] (S <= 128, Dh a power of two >= 16; fp16, bf16 or fp32).
        num_warps: warps per program (None: by the padded length).

    Returns:
        [B, S, H*Dh] in qkv's dtype.
    """
    b, s, hd = _checked(qkv, heads)
    block_s = _padded(s)
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
    b, s, hd = _checked(qkv, heads)
    block_s = _padded(s)
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


def _blocked_refusal(seq_len: int, head_dim: int, dtype: torch.dtype, first_query: int) -> str | None:
    """Why the blocked kernels cannot take this shape or dtype, or None when they can."""
    if not 1 <= seq_len <= _MAX_BLOCKED:
        return (
            f"the blocked training attention kernels take 1..{_MAX_BLOCKED} tokens, got {seq_len}: "
            "use train_attention, which sends longer rows to PyTorch's SDPA"
        )
    if not 0 <= first_query < seq_len:
        return (
            f"first_query must be in 0..{seq_len - 1} (at least one query row of the {seq_len}), got {first_query}: "
            "use train_attention, which sends an empty query range to PyTorch's SDPA"
        )
    if _head_refused(head_dim, dtype):
        return (
            "the blocked training attention kernels need a head width that is a power of two >= 16 and "
            f"fp16/bf16/fp32, got Dh={head_dim}, {dtype}: use train_attention, which sends the rest to PyTorch's SDPA"
        )
    return None


Launch = tuple[int, int, int, int]  # (block_q, block_k, num_warps, num_stages)


def _blocked_launch(kernel: str, head_dim: int, launch: Launch | None) -> Launch:
    """The launch settings of blocked kernel ``kernel`` ("fwd", "dkdv", "dq"): ``launch`` if given (checked), else
    the timed table's for this head width."""
    if launch is None:
        return _BLOCKED_LAUNCH[kernel, 32 if head_dim <= 32 else 64]
    bq, bk, warps, stages = launch
    if any(n < 16 or n & (n - 1) for n in (bq, bk)) or warps < 1 or warps & (warps - 1) or stages < 1:
        raise ValueError(
            "launch must be (block_q, block_k, num_warps, num_stages): blocks powers of two >= 16 (tl.dot's "
            f"minimum), warps a power of two, stages >= 1; got {launch}"
        )
    return launch


def blocked_attention_forward(
    qkv: torch.Tensor,
    heads: int,
    first_query: int = 0,
    *,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of the query rows ``first_query..S-1`` of every (row, head) of ``qkv`` over all S keys,
    blockwise (online softmax over key blocks), and the log-sum-exp its backward needs.

    Args:
        qkv: [B, S, 3*H*Dh] (S <= 256, Dh a power of two >= 16; fp16, bf16 or fp32).
        heads: H.
        first_query: rows before it are keys only (0 <= first_query < S).
        launch: (block_q, block_k, num_warps, num_stages): query and key rows per block (powers of two >= 16),
            warps per program, software pipelining stages; None: the timed table's (``_BLOCKED_LAUNCH``).

    Returns:
        out [B, S_q, H*Dh] in qkv's dtype, and lse [B, H, S_q] float32: the natural log of each query row's
        softmax denominator over its scaled scores.
    """
    b, s, hd = _checked(qkv, heads, _blocked_refusal, first_query)
    block_q, block_k, warps, stages = _blocked_launch("fwd", hd, launch)
    assert triton is not None  # _checked raised otherwise
    qkv = qkv.contiguous()
    n_q = s - first_query
    out = torch.empty(b, n_q, heads * hd, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(b, heads, n_q, device=qkv.device, dtype=torch.float32)
    _blocked_attention_fwd_kernel[(b * heads, triton.cdiv(n_q, block_q))](
        qkv, out, lse, s, first_query, hd**-0.5 * _LOG2E, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        HEADS=heads, HEAD_DIM=hd, BLOCK_Q=block_q, BLOCK_K=block_k, KEY_BLOCKS=triton.cdiv(s, block_k),
        IEEE=qkv.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def blocked_attention_backward(
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    heads: int,
    first_query: int = 0,
    *,
    launch: tuple[Launch | None, Launch | None] = (None, None),
) -> torch.Tensor:
    """The gradient of :func:`blocked_attention_forward`'s output with respect to ``qkv``.

    Args:
        qkv: [B, S, 3*H*Dh] the forward's input.
        out: [B, S_q, H*Dh] its output, lse: [B, H, S_q] float32 its log-sum-exp.
        dout: [B, S_q, H*Dh] the gradient of its output.
        heads: H.
        first_query: the forward's.
        launch: the (dK/dV, dQ) kernels' settings, each as the forward's ``launch``.

    Returns:
        dqkv [B, S, 3*H*Dh] in qkv's dtype, contiguous: the q part zero in the rows before ``first_query`` (they
        are no queries), the k and v parts in every row.
    """
    b, s, hd = _checked(qkv, heads, _blocked_refusal, first_query)
    kv_launch, q_launch = _blocked_launch("dkdv", hd, launch[0]), _blocked_launch("dq", hd, launch[1])
    assert triton is not None  # _checked raised otherwise
    n_q = s - first_query
    for name, t, shape, dtype in (
        ("out", out, (b, n_q, heads * hd), qkv.dtype),
        ("dout", dout, (b, n_q, heads * hd), qkv.dtype),
        ("lse", lse, (b, heads, n_q), torch.float32),
    ):
        if t.shape != shape or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} {list(shape)}, got {t.dtype} {tuple(t.shape)}")
    qkv, out, lse, dout = qkv.contiguous(), out.contiguous(), lse.contiguous(), dout.contiguous()
    dqkv = torch.empty_like(qkv)
    if first_query:
        dqkv[:, :first_query, : heads * hd].zero_()  # the dQ kernel writes only the query rows
    delta = torch.empty_like(lse)  # [B, H, S_q] rowsum(dO * O), fp32
    _blocked_attention_delta_kernel[(b * heads, triton.cdiv(n_q, 64))](
        out, dout, delta, n_q, out.stride(0), out.stride(1), HEADS=heads, HEAD_DIM=hd, BLOCK_Q=64, num_warps=4,
    )  # fmt: skip
    strides = (qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1))
    args = (qkv, dout, lse, delta, dqkv, s, first_query, hd**-0.5, *strides)
    meta = dict(HEADS=heads, HEAD_DIM=hd, IEEE=qkv.dtype == torch.float32)
    bq, bk, warps, stages = kv_launch
    _blocked_attention_dkdv_kernel[(b * heads, triton.cdiv(s, bk))](
        *args, BLOCK_Q=bq, BLOCK_K=bk, QUERY_BLOCKS=triton.cdiv(n_q, bq), num_warps=warps, num_stages=stages, **meta
    )
    bq, bk, warps, stages = q_launch
    _blocked_attention_dq_kernel[(b * heads, triton.cdiv(n_q, bq))](
        *args, BLOCK_Q=bq, BLOCK_K=bk, KEY_BLOCKS=triton.cdiv(s, bk), num_warps=warps, num_stages=stages, **meta
    )
    return dqkv


class _BlockedAttention(torch.autograd.Function):
    """blocked_attention_forward forward, blocked_attention_backward backward (saves ``qkv``, the output and the
    log-sum-exp: the probabilities are recomputed block by block, never stored)."""

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, heads: int, first_query: int) -> torch.Tensor:
        qkv = qkv.contiguous()
        out, lse = blocked_attention_forward(qkv, heads, first_query)
        ctx.save_for_backward(qkv, out, lse)
        ctx.heads, ctx.first_query = heads, first_query
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        qkv, out, lse = ctx.saved_tensors
        return blocked_attention_backward(qkv, out, lse, dout, ctx.heads, ctx.first_query), None, None


# ------------------------------------------------------------------------------ fallbacks
_WORKING: dict[tuple[str, str, torch.dtype], bool] = {}  # (kernel family, device, dtype) -> built and ran here


def _works(name: str, like: torch.Tensor, trial: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether a family of kernels builds and runs here: ``trial`` (a tiny forward and backward in ``like``'s dtype
    and device) is run once; a failure (Triton compiles a C launcher at first use, and a machine may lack a
    compiler) leaves PyTorch's ops in their place, with one warning."""
    key = (name, str(like.device), like.dtype)
    if key not in _WORKING:
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            return True  # a capture follows a warm-up (avex.train.step), which has run the trial
        try:
            with torch.enable_grad():
                x = torch.linspace(-1.0, 1.0, 480, device=like.device).view(2, 5, 48)  # no draw from a generator
                x = x.to(like.dtype).requires_grad_()
                trial(x).float().sum().backward()
            _WORKING[key] = True
        except Exception as err:  # deliberately broad: Triton's build and driver errors have no common type
            _WORKING[key] = False
            warnings.warn(
                f"avex: the Triton {name} kernels failed on this machine ({type(err).__name__}: {str(err)[:300]}); "
                "the training step uses PyTorch's instead (same results, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
    return _WORKING[key]


def _attention_trial(x: torch.Tensor) -> torch.Tensor:
    return _ShortAttention.apply(x, 1)  # one head of 16


def _blocked_trial(x: torch.Tensor) -> torch.Tensor:
    return _BlockedAttention.apply(x, 1, 1)  # one head of 16, a key-only first row


def short_kernel_applies(qkv: torch.Tensor, heads: int) -> bool:
    """Whether :func:`train_attention` takes the Triton kernels for ``qkv`` (CUDA or Triton's interpreter, at most
    :data:`TRAIN_SHORT` tokens, a head width and dtype the kernels take)."""
    if not _device_may_run(qkv):
        return False
    b, s, hd = _check_qkv(qkv, heads, None)
    usable = s <= TRAIN_SHORT and _train_refusal(s, hd, qkv.dtype) is None
    return usable and _works("attention", qkv, _attention_trial)


def blocked_kernel_applies(qkv: torch.Tensor, heads: int, first_query: int = 0) -> bool:
    """Whether the blocked kernels can take ``qkv`` from ``first_query`` on (CUDA or Triton's interpreter, at most
    :data:`TRAIN_BLOCKED` tokens, at least one query row, a head width and dtype the kernels take)."""
    if not _device_may_run(qkv):
        return False
    b, s, hd = _check_qkv(qkv, heads, None)
    usable = s <= TRAIN_BLOCKED and _blocked_refusal(s, hd, qkv.dtype, first_query) is None
    return usable and _works("blocked attention", qkv, _blocked_trial)


def train_attention(qkv: torch.Tensor, heads: int, first_query: int = 0) -> torch.Tensor:
    """Softmax self-attention with autograd, every key valid, from the rows ``first_query:`` on.

    Args:
        qkv: [B, S, 3*H*Dh] (timm's and the decoder's qkv projection output).
        heads: H.
        first_query: rows before it are keys only.

    Returns:
        [B, S - first_query, H*Dh], heads side by side (the output projection's input).

    The register kernels where they apply (first_query 0, at most :data:`TRAIN_SHORT` tokens: the fastest there),
    else the blocked kernels (at most :data:`TRAIN_BLOCKED` tokens), else PyTorch's SDPA.
    """
    if first_query == 0 and short_kernel_applies(qkv, heads):
        return _ShortAttention.apply(qkv, heads)
    if blocked_kernel_applies(qkv, heads, first_query):
        return _BlockedAttention.apply(qkv, heads, first_query)
    b, s, hd = _check_qkv(qkv, heads, None)
    q, k, v = qkv.view(b, s, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(q[:, :, first_query:], k, v)  # [B, H, S', Dh]
    return out.transpose(1, 2).reshape(b, s - first_query, heads * hd)
