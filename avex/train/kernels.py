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

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from avex.attention import _KERNEL_DTYPES, _check_qkv
from avex.kernel_fallback import _interpreted, triton

if triton is not None:
    import triton.language as tl

    from avex.attention import _dot, _short_attention_kernel

__all__ = [
    "SDPA_BACKENDS",
    "TRAIN_SHORT",
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


def short_kernel_applies(qkv: torch.Tensor, heads: int) -> bool:
    """Whether :func:`train_attention` takes the Triton kernels for ``qkv`` (CUDA or Triton's interpreter, at most
    :data:`TRAIN_SHORT` tokens, a head width and dtype the kernels take)."""
    if triton is None or not (qkv.is_cuda or _interpreted()):
        return False
    b, s, hd = _check_qkv(qkv, heads, None)
    usable = s <= TRAIN_SHORT and _train_refusal(s, hd, qkv.dtype) is None
    return usable and _works("attention", qkv, _attention_trial)


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
