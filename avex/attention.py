"""Self-attention of the ViT blocks on TORE's short sequences: kernel choice and a kernel written for them.

TORE runs thousands of short sequences at once: the iterator attends over ``P + G`` tokens per glimpse
(5 for a CLS token and a 2x2 glimpse) and the aggregator over ``P + t*G`` (49 after 12 glimpses). On
such shapes a kernel's fixed cost per (row, head) decides, not arithmetic (``benchmarks/sdpa_short.py``
times every kernel on them). Two things live here:

* :func:`short_attention`, a Triton kernel (CUDA, inference): one program per (row, head) keeps the whole
  sequence (up to :data:`SHORT_SEQUENCE` tokens) in registers, reads q, k and v straight out of the qkv
  projection's output ``[B, S, 3*H*Dh]`` and writes ``[B, S, H*Dh]``, the layout the output projection
  reads, so the permute and reshape copies around PyTorch's attention disappear too;
* :func:`run_blocks`, which runs timm ``Block``s over ``[B, S, D]`` with the kernel each shape should get:
  the Triton kernel where it applies, else PyTorch's SDPA with a priority list of backends. Where the layer
  norm kernel applies too, :func:`fused_blocks` runs each residual add in one pass with the norm that reads
  its sum next (8 kernels a block instead of 10: at K=12, TORE's few rows per step pay a fixed cost per
  kernel).

The iterator and the aggregator both go through :func:`run_blocks`, so K=0 (full recomputation) gets the
same kernels as every other K. ``AVEX_SDPA`` overrides the choice: ``default`` (plain timm blocks,
PyTorch's own SDPA choice) or a comma-separated priority list of ``triton``, ``efficient``, ``flash``,
``math`` and ``cudnn``.

Shapes: B rows, S tokens, D width, H heads, Dh = D / H head width.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import TypeGuard, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, LayerScale, Mlp
from timm.models.vision_transformer import Block
from torch.nn.attention import SDPBackend, sdpa_kernel

from avex.kernel_fallback import _kernel_may_run, kernel_or_fallback, triton
from avex.layer_norm import norm_applies, norm_forward, residual_norm

if triton is not None:
    import triton.language as tl

__all__ = [
    "SHORT_SEQUENCE",
    "SHORT_SEQUENCE_BACKENDS",
    "attention_choice",
    "block_forward",
    "fused_blocks",
    "reference_attention",
    "run_blocks",
    "short_attention",
    "short_attention_available",
]

SHORT_SEQUENCE = 64  # tokens: up to this many, CUDA attention follows SHORT_SEQUENCE_BACKENDS
# In order of preference (``benchmarks/sdpa_short.py`` times them on these shapes): the Triton kernel, whose
# fixed cost per (row, head) is the smallest; then PyTorch's memory-efficient kernel, its fastest SDPA backend
# on sequences this short. cuDNN, PyTorch's own first choice on Hopper, only wins on longer sequences, which
# is where this list stops applying.
SHORT_SEQUENCE_BACKENDS = ("triton", "efficient", "flash", "math")
_SDPA_BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def short_attention_available() -> bool:
    """Whether the Triton kernel can run here (Triton importable; on CPU only under ``TRITON_INTERPRET=1``)."""
    return triton is not None


# ----------------------------------------------------------------------------- the Triton kernel
if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` on tensor cores with fp32 accumulation; fp32 inputs (IEEE) get exact fp32 products, not TF32.

        Shared by this file's kernel and :mod:`avex.entropy_attention`'s.
        """
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _short_attention_kernel(
        qkv_ptr,
        out_ptr,
        valid_ptr,
        seq_len,
        scale,
        stride_qkv_b,
        stride_qkv_s,
        stride_out_b,
        stride_out_s,
        stride_valid_b,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,
        HAS_VALID: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program = one (row b, head h): the whole sequence fits in registers.
        pid = tl.program_id(0)
        b = (pid // HEADS).to(tl.int64)  # 64-bit offsets: rows x stride can pass 2**31 at large batches
        h = pid % HEADS
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, HEAD_DIM)
        in_seq = s < seq_len
        # qkv's last axis is (3, H, Dh), as timm's Attention reshapes it.
        base = qkv_ptr + b * stride_qkv_b + s[:, None] * stride_qkv_s + h * HEAD_DIM + d[None, :]
        q = tl.load(base, mask=in_seq[:, None], other=0.0)
        k = tl.load(base + HEADS * HEAD_DIM, mask=in_seq[:, None], other=0.0)
        v = tl.load(base + 2 * HEADS * HEAD_DIM, mask=in_seq[:, None], other=0.0)
        # Tensor-core matmuls, padded to BLOCK_S >= 16 rows (tl.dot's minimum): even at a handful of tokens
        # they beat fp32 multiply-adds over fewer padded rows (``sdpa_short.py --tune`` compares the two).
        scores = _dot(q, tl.trans(k), IEEE) * scale
        keep = in_seq
        if HAS_VALID:
            keep = keep & (tl.load(valid_ptr + b * stride_valid_b + s, mask=in_seq, other=0) != 0)
        scores = tl.where(keep[None, :], scores, float("-inf"))
        # Softmax in fp32; padded query rows still see the real keys, so no row is all -inf.
        p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        o = _dot(p.to(v.dtype), v, IEEE)
        out = out_ptr + b * stride_out_b + s[:, None] * stride_out_s + h * HEAD_DIM + d[None, :]
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=in_seq[:, None])


def _check_qkv(qkv: torch.Tensor, heads: int, valid: torch.Tensor | None) -> tuple[int, int, int]:
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"qkv must be [B, S, 3*H*Dh] with H={heads}, got {tuple(qkv.shape)}")
    b, s, three_d = qkv.shape
    if valid is not None and (valid.shape != (b, s) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool key mask [B, S] = [{b}, {s}], got {valid.dtype} {tuple(valid.shape)}")
    return b, s, three_d // (3 * heads)


def _kernel_refusal(seq_len: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot take this shape or dtype, or None when it can."""
    if not 1 <= seq_len <= SHORT_SEQUENCE:
        return f"short_attention takes 1..{SHORT_SEQUENCE} tokens, got {seq_len}: use reference_attention"
    if head_dim < 16 or head_dim & (head_dim - 1) or dtype not in _KERNEL_DTYPES:
        return (
            "short_attention needs a head width that is a power of two >= 16 and fp16/bf16/fp32, "
            f"got Dh={head_dim}, {dtype}"
        )
    return None


def short_attention(
    qkv: torch.Tensor,
    heads: int,
    valid: torch.Tensor | None = None,
    *,
    block_s: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Softmax attention of every (row, head) of ``qkv``, by the Triton kernel (no autograd).

    Args:
        qkv: [B, S, 3*H*Dh], last axis ordered (3, H, Dh) as timm's ``Attention.qkv`` gives it;
            S <= :data:`SHORT_SEQUENCE`, Dh a power of two >= 16; fp16, bf16 or fp32.
        heads: H.
        valid: [B, S] bool, False for keys to ignore (padding); None: every key counts.
        block_s, num_warps: launch settings (a power of two >= max(S, 16); warps per program); None:
            :func:`_launch`'s choice.

    Returns:
        [B, S, H*Dh] in qkv's dtype: heads side by side, ready for the output projection.
    """
    if triton is None:
        raise RuntimeError("short_attention needs Triton (it ships with PyTorch's CUDA wheels: pip install triton)")
    b, s, hd = _check_qkv(qkv, heads, valid)
    refusal = _kernel_refusal(s, hd, qkv.dtype)
    if refusal:
        raise ValueError(refusal)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if valid is not None and valid.stride(-1) != 1:
        valid = valid.contiguous()
    default_block, default_warps = _launch(s)
    block_s, num_warps = block_s or default_block, num_warps or default_warps
    if block_s < max(s, 16) or block_s & (block_s - 1):
        raise ValueError(f"block_s must be a power of two >= 16 and >= the sequence length {s}, got {block_s}")
    out = torch.empty(b, s, heads * hd, device=qkv.device, dtype=qkv.dtype)
    valid_arg = valid if valid is not None else out  # never read when HAS_VALID is False
    _short_attention_kernel[(b * heads,)](
        qkv,
        out,
        valid_arg,
        s,
        hd**-0.5,
        qkv.stride(0),
        qkv.stride(1),
        out.stride(0),
        out.stride(1),
        valid.stride(0) if valid is not None else 0,
        HEADS=heads,
        HEAD_DIM=hd,
        BLOCK_S=block_s,
        HAS_VALID=valid is not None,
        IEEE=qkv.dtype == torch.float32,
        num_warps=num_warps,
    )
    return out


def _launch(seq_len: int) -> tuple[int, int]:
    """(BLOCK_S, num_warps) for a sequence length: the padded length for tensor-core matmuls, and warps.

    Warps as ``sdpa_short.py --tune`` chose them, alike for ViT-B and for the Fashion-MNIST env's ViT: one
    warp up to 32 tokens (faster there than two), four beyond.
    """
    return max(16, triton.next_power_of_2(seq_len)), 4 if seq_len > 32 else 1


def reference_attention(qkv: torch.Tensor, heads: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`short_attention` computes, by PyTorch's SDPA (any device, any length, autograd).

    Args and returns as :func:`short_attention`.
    """
    b, s, hd = _check_qkv(qkv, heads, valid)
    q, k, v = qkv.view(b, s, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None if valid is None else valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, heads * hd)


# ------------------------------------------------------------------------------- block forward
def _plain_block(blk: nn.Module) -> TypeGuard[Block]:
    """Whether ``blk`` is a timm ``Block`` whose attention :func:`block_forward` reproduces exactly."""
    attn = getattr(blk, "attn", None)
    return (
        type(blk) is Block
        and type(attn) is Attention
        and getattr(attn, "gate", None) is None
        and isinstance(attn.q_norm, nn.Identity)
        and isinstance(attn.k_norm, nn.Identity)
    )


def _kernel_or_reference(qkv: torch.Tensor, heads: int, valid: torch.Tensor | None) -> torch.Tensor:
    """:func:`short_attention`, or :func:`reference_attention` once the kernel has failed here."""
    return kernel_or_fallback(
        "attention",
        lambda: short_attention(qkv, heads, valid),
        lambda: reference_attention(qkv, heads, valid),
        "attention now uses PyTorch's SDPA, with the same results but slower. Fix the Triton install (it needs "
        "a C compiler at first use) or set AVEX_SDPA=efficient,flash,math to skip the kernel.",
    )


def block_forward(blk: Block, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """timm's ``Block.forward`` (pre-norm attention and MLP, layer scale, drop path) with attention by
    :func:`short_attention` where it applies (CUDA or the Triton interpreter, no autograd, short
    sequence), else :func:`reference_attention`; both norms by :func:`avex.layer_norm.norm_forward` (many
    rows per program on CUDA; the modules themselves elsewhere).

    Args:
        blk: a plain timm ``Block`` (see :func:`run_blocks`).
        x: [B, S, D].
        valid: [B, S] bool key mask or None.

    Returns:
        [B, S, D].
    """
    attn = cast(Attention, blk.attn)  # timm types it Module; a plain Block's is an Attention (_plain_block)
    a = _attend(attn, attn.qkv(norm_forward(blk.norm1, x)), valid)
    x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(a)))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(norm_forward(blk.norm2, x))))


def _attend(attn: Attention, qkv: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Attention of a plain block on its qkv projection [B, S, 3*D]: the kernel where it may run on this shape,
    else :func:`reference_attention`. Returns [B, S, D]."""
    usable = _kernel_may_run(qkv) and _kernel_refusal(qkv.shape[1], attn.head_dim, qkv.dtype) is None
    return (
        _kernel_or_reference(qkv, attn.num_heads, valid) if usable else reference_attention(qkv, attn.num_heads, valid)
    )


def _gamma(scale: nn.Module) -> torch.Tensor | None:
    """A branch's layer scale as a vector (timm's ``LayerScale``), or None (``Identity``)."""
    return scale.gamma if isinstance(scale, LayerScale) else None


def _fusable(blocks: list[nn.Module], x: torch.Tensor) -> bool:
    """Whether :func:`fused_blocks` computes these blocks on x: each a plain block (:func:`block_forward`'s) in
    eval mode, its MLP timm's plain ``Mlp``, its norms ones the layer norm kernel takes for x
    (:func:`~avex.layer_norm.norm_applies`: CUDA or the interpreter, no autograd, enough rows or a graph being
    captured), the output projections with biases and the layer scales (if any) in x's dtype."""
    for blk in blocks:
        if blk.training or not _plain_block(blk):
            return False
        mlp = blk.mlp
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity) or not isinstance(mlp.fc2, nn.Linear):
            return False
        if not (norm_applies(blk.norm1, x) and norm_applies(blk.norm2, x)):
            return False
        outs = (cast(nn.Linear, blk.attn.proj), mlp.fc2)
        if any(lin.bias is None or lin.bias.dtype != x.dtype for lin in outs):
            return False
        scales = (blk.ls1, blk.ls2)
        if any(
            not isinstance(s, nn.Identity) and (type(s) is not LayerScale or s.gamma.dtype != x.dtype) for s in scales
        ):
            return False
    return bool(blocks)


def fused_blocks(blocks: list[Block], x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The blocks' forward (inference, as :func:`block_forward` block after block) with each residual add in one
    pass with the norm that reads its sum next (:func:`~avex.layer_norm.residual_norm`): the attention branch's
    with the block's second norm, the MLP branch's with the next block's first (the last block's alone). The
    output projections run without their biases, which those passes add. Each block then takes 8 kernels instead
    of 10 (the two adds are gone): at TORE's K=12 a step has few rows and pays a fixed cost per kernel.

    Args:
        blocks: plain timm ``Block``s that :func:`_fusable` accepts for x (:func:`run_blocks` checks).
        x: [B, S, D]. valid: [B, S] bool key mask or None.

    Returns:
        [B, S, D], within rounding of :func:`block_forward`'s (each sum rounded once, the bias added in fp32).
    """
    n = norm_forward(blocks[0].norm1, x)
    for i, blk in enumerate(blocks):
        attn, mlp = cast(Attention, blk.attn), cast(Mlp, blk.mlp)
        proj, fc2 = attn.proj, mlp.fc2
        a = _attend(attn, attn.qkv(n), valid)
        assert proj.bias is not None and fc2.bias is not None  # _fusable
        x, n = residual_norm(x, F.linear(a, proj.weight), proj.bias, _gamma(blk.ls1), blk.norm2)
        h = mlp.act(mlp.fc1(n))
        after = blocks[i + 1].norm1 if i + 1 < len(blocks) else None
        x, n = residual_norm(x, F.linear(h, fc2.weight), fc2.bias, _gamma(blk.ls2), after)
    return x


def attention_choice() -> tuple[str, ...]:
    """The backend priority list from ``AVEX_SDPA`` (``auto``: :data:`SHORT_SEQUENCE_BACKENDS`; ``default``: ())."""
    choice = os.environ.get("AVEX_SDPA", "auto")
    if choice == "auto":
        return SHORT_SEQUENCE_BACKENDS
    if choice == "default":
        return ()
    names = tuple(choice.split(","))
    unknown = [n for n in names if n != "triton" and n not in _SDPA_BACKENDS]
    if unknown:
        raise ValueError(
            f"AVEX_SDPA={choice!r}: unknown backend(s) {unknown}; use auto, default or a comma-separated "
            f"list of {['triton', *sorted(_SDPA_BACKENDS)]}"
        )
    return names


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``blocks`` over ``x`` with the attention kernel its shape should get.

    On CUDA (and under Triton's interpreter), sequences of <= :data:`SHORT_SEQUENCE` tokens follow the
    priority list of :func:`attention_choice`: ``triton`` first means :func:`block_forward` with the Triton
    kernel (inference only; anything it does not cover, training included, drops to the next entry; where the
    layer norm kernel applies too, :func:`fused_blocks`), the others are SDPA backends tried in that order
    (``set_priority``: without it PyTorch's own order, flash before efficient, would decide). Elsewhere, and for
    longer sequences, plain timm blocks with PyTorch's own choice.

    Args:
        blocks: timm ViT blocks.
        x: [B, S, D].
        valid: [B, S] bool key mask (padding of rows with fewer glimpses) or None.

    Returns:
        [B, S, D].
    """
    names = attention_choice()
    short = x.shape[1] <= SHORT_SEQUENCE and bool(names)
    sdpa = [_SDPA_BACKENDS[n] for n in names if n != "triton"] if short and x.is_cuda else []
    ctx = sdpa_kernel(sdpa, set_priority=True) if sdpa else contextlib.nullcontext()
    kernel = short and names[0] == "triton" and _kernel_may_run(x)
    mask = None if valid is None else valid[:, None, None, :]
    blocks = list(blocks)
    with ctx:
        if kernel and _fusable(blocks, x):
            return fused_blocks(cast(list[Block], blocks), x, valid)
        for blk in blocks:
            if kernel and not blk.training and _plain_block(blk):
                x = block_forward(blk, x, valid)
            else:
                x = blk(x, attn_mask=mask) if mask is not None else blk(x)
    return x
