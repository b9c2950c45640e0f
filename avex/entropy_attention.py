"""Attention and AME's attention entropy in one pass, without ever writing the attention map.

AME scores every unseen patch by the entropy of its decoder attention row. Taken from a materialised
float32 map ``[B, H, Q, S]`` (``S = 1 + N`` keys, ``Q = N`` query rows), that map is the env's largest
tensor and the decoder the slowest part of a step. The entropy of a softmax row can instead be
accumulated beside the online softmax (flash-attention style), one block of keys at a time. In log2
units (``s = q.k * scale * log2(e)``), per query row and head:

* ``m``  the running maximum of ``s`` over every key;
* ``l = sum_j 2^(s_j - m)`` over every key: the softmax normaliser (CLS included);
* ``e = sum_{j in E} 2^(s_j - m)`` and ``w = sum_{j in E} 2^(s_j - m) (s_j - m)`` (``w <= 0``) over the
  entropy keys ``E`` (every key from ``skip_keys`` on: AME leaves CLS, key 0, out of the sum but in the
  normaliser);

then ``-sum_{j in E} p_j log2 p_j = (e log2 l - w) / l``. Both terms are >= 0, so nothing cancels; the
form ``log l + m - u / l`` with ``u = sum 2^(s - m) s`` subtracts two numbers that grow with ``|s|`` and
loses the entropy to rounding at large scores. When a block raises ``m`` to ``m'``, every sum is rescaled
by ``2^(m - m')`` and ``w`` also takes ``(m - m') e`` (its offsets ``s - m`` move).

Three functions, same arguments and results:

* :func:`entropy_attention_kernel`: the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``; no
  autograd). One program per (row, block of query rows) loops over the heads, so the sum over heads stays
  in registers (no atomics: deterministic). Lengths rarely fill whole blocks (the decoder's 196 queries and
  197 keys), so full blocks run unmasked and what is left over runs as one smaller tail block (:func:`_blocks`;
  the keys in every program, the queries in a program of their own): 208 x 208 scores per head, not 256 x 256.
* :func:`reference_entropy_attention`: PyTorch, any device, autograd; it computes what the decoder always
  computed (scores in the input's dtype, softmax and entropy in float32), over chunks of query rows so that
  the probability map is never held whole.
* :func:`entropy_attention`: the kernel where it can run, else the reference. ``AVEX_ENTROPY_KERNEL=0``
  forces the reference (an A/B switch for benchmarks).

All three take ``rows=``: sequences read through an index from a table of distinct rows (the decoder's
mask-token rows are the same in every sequence, so they are projected once and never copied per row).

Shapes: B rows, S tokens (keys), Q = S - first_query query rows, H heads, Dh head width.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from avex.attention import _KERNEL_DTYPES, _check_qkv
from avex.kernel_fallback import _kernel_may_run, kernel_or_fallback, sm_count, triton

if triton is not None:
    import triton.language as tl

    from avex.attention import _dot

__all__ = [
    "DEFAULT_LAUNCH",
    "ENTROPY_KERNEL_ENV",
    "LAUNCHES",
    "Launch",
    "entropy_attention",
    "entropy_attention_kernel",
    "reference_entropy_attention",
]

ENTROPY_KERNEL_ENV = "AVEX_ENTROPY_KERNEL"  # "0": always the PyTorch reference
# Probabilities the reference holds at once (float32 elements): B * H * rows * S per chunk of query rows.
_CHUNK_ELEMENTS = 1 << 24
_LOG2E = 1.0 / math.log(2.0)


# ----------------------------------------------------------------------------------------- the kernel
if triton is not None:

    @triton.jit
    def _key_block(
        q,
        base,
        rows_ptr,
        row_off,
        stride_qkv_s,
        h,
        start,
        seq_len,
        skip_keys,
        scale_log2,
        m_i,
        l_i,
        e_i,
        w_i,
        acc,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        TAIL: tl.constexpr,
        OUTPUT: tl.constexpr,
        ENTROPY: tl.constexpr,
        INDEXED: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # Keys start..start+BLOCK_N-1 into the running sums of BLOCK_M query rows of one head. Only the TAIL block
        # can run past the sequence: full blocks carry no key mask (one select per score fewer).
        keys = start + tl.arange(0, BLOCK_N)
        in_k = keys < seq_len
        if INDEXED:
            if TAIL:
                k_at = tl.load(rows_ptr + row_off + keys, mask=in_k, other=0).to(tl.int64)
            else:
                k_at = tl.load(rows_ptr + row_off + keys).to(tl.int64)
        else:
            k_at = keys.to(tl.int64)
        kv_ptrs = base + k_at[:, None] * stride_qkv_s
        if TAIL:
            k = tl.load(kv_ptrs + (HEADS + h) * HEAD_DIM, mask=in_k[:, None], other=0.0)
        else:
            k = tl.load(kv_ptrs + (HEADS + h) * HEAD_DIM)
        s = _dot(q, tl.trans(k), IEEE)  # [BLOCK_M, BLOCK_N] fp32, unscaled
        if TAIL:
            s = tl.where(in_k[None, :], s, float("-inf"))
        # The scale is > 0, so the maximum of the scaled scores is the scaled maximum (rounding is monotonic).
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale_log2)  # finite: key 0 is in the first block
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
        t = s * scale_log2 - m_new[:, None]  # log2 units, <= 0 (one fused multiply-add)
        p = tl.exp2(t)
        p_sum = tl.sum(p, axis=1)
        l_i = l_i * alpha + p_sum
        if ENTROPY:
            # The old offsets move by m_i - m_new (-inf on the first block, where e_i = 0: never 0 * inf).
            w_i = (w_i + tl.where(e_i > 0, m_i - m_new, 0.0) * e_i) * alpha
            if TAIL:
                t = tl.where(in_k[None, :], t, 0.0)  # -inf at padded keys, where p = 0: 0 * -inf is NaN
            if start < skip_keys:  # a block holding skipped keys (CLS): only the first, for AME's skip_keys = 1
                in_e = (keys >= skip_keys)[None, :]
                p_e = tl.where(in_e, p, 0.0)
                w_i += tl.sum(p_e * t, axis=1)
                e_i = e_i * alpha + tl.sum(p_e, axis=1)
            else:  # every key of the block is summed: the normaliser's sum serves the entropy's too
                w_i += tl.sum(p * t, axis=1)
                e_i = e_i * alpha + p_sum
        if OUTPUT:
            if TAIL:
                v = tl.load(kv_ptrs + (2 * HEADS + h) * HEAD_DIM, mask=in_k[:, None], other=0.0)
            else:
                v = tl.load(kv_ptrs + (2 * HEADS + h) * HEAD_DIM)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return m_new, l_i, e_i, w_i, acc

    @triton.jit
    def _query_block(
        qkv_ptr,
        rows_ptr,
        out_ptr,
        ent_ptr,
        b,
        row_start,
        seq_len,
        first_query,
        skip_keys,
        scale_log2,
        stride_qkv_b,
        stride_qkv_s,
        stride_rows_b,
        stride_out_b,
        stride_out_s,
        stride_ent_b,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FULL_KEY_BLOCKS: tl.constexpr,
        TAIL_N: tl.constexpr,
        OUTPUT: tl.constexpr,
        ENTROPY: tl.constexpr,
        INDEXED: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # Query rows row_start..row_start+BLOCK_M-1 of row b, every head (the entropy is summed over heads here).
        rows = row_start + tl.arange(0, BLOCK_M)  # query index, 0..Q-1
        d = tl.arange(0, HEAD_DIM)
        in_q = rows + first_query < seq_len
        row_off = b * stride_rows_b
        if INDEXED:  # token s of row b is the table's row rows[b, s]
            base = qkv_ptr + d[None, :]
            q_at = tl.load(rows_ptr + row_off + rows + first_query, mask=in_q, other=0).to(tl.int64)
        else:
            base = qkv_ptr + b * stride_qkv_b + d[None, :]  # qkv's last axis is (3, H, Dh), as timm's
            q_at = (rows + first_query).to(tl.int64)
        q_ptrs = base + q_at[:, None] * stride_qkv_s
        ent_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for h in range(HEADS):  # not unrolled: two query blocks x two key-block bodies already make four copies
            q = tl.load(q_ptrs + h * HEAD_DIM, mask=in_q[:, None], other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            e_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            w_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            # Constexpr trip counts: one compilation per (S, BLOCK_N), and Triton's interpreter cannot loop to a
            # runtime bound. The keys left over after the full blocks go in one smaller tail block (_blocks).
            for kb in range(FULL_KEY_BLOCKS):
                m_i, l_i, e_i, w_i, acc = _key_block(
                    q, base, rows_ptr, row_off, stride_qkv_s, h, kb * BLOCK_N, seq_len, skip_keys, scale_log2,
                    m_i, l_i, e_i, w_i, acc,
                    HEADS, HEAD_DIM, BLOCK_N, False, OUTPUT, ENTROPY, INDEXED, IEEE,
                )  # fmt: skip
            if TAIL_N > 0:
                m_i, l_i, e_i, w_i, acc = _key_block(
                    q, base, rows_ptr, row_off, stride_qkv_s, h, FULL_KEY_BLOCKS * BLOCK_N, seq_len, skip_keys,
                    scale_log2, m_i, l_i, e_i, w_i, acc,
                    HEADS, HEAD_DIM, TAIL_N, True, OUTPUT, ENTROPY, INDEXED, IEEE,
                )  # fmt: skip
            if OUTPUT:
                out = out_ptr + b * stride_out_b + rows[:, None] * stride_out_s + h * HEAD_DIM + d[None, :]
                tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=in_q[:, None])
            if ENTROPY:
                ent_sum += (e_i * tl.log2(l_i) - w_i) / l_i
        if ENTROPY:
            tl.store(ent_ptr + b * stride_ent_b + rows, ent_sum, mask=in_q)

    @triton.jit
    def _entropy_attention_kernel(
        qkv_ptr,
        rows_ptr,
        out_ptr,
        ent_ptr,
        seq_len,
        first_query,
        skip_keys,
        scale_log2,
        stride_qkv_b,
        stride_qkv_s,
        stride_rows_b,
        stride_out_b,
        stride_out_s,
        stride_ent_b,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FULL_KEY_BLOCKS: tl.constexpr,
        TAIL_N: tl.constexpr,
        FULL_QUERY_BLOCKS: tl.constexpr,
        TAIL_M: tl.constexpr,
        OUTPUT: tl.constexpr,
        ENTROPY: tl.constexpr,
        INDEXED: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program = one row b and one block of query rows: a full block of BLOCK_M, or the TAIL_M rows left over
        # (196 queries in blocks of 64: 3 x 64 + 16 rows computed, not 4 x 64). No program runs two blocks: where the
        # programs do not fill the GPU, a kernel lasts as long as its longest program.
        # The batch row on the grid's first axis: the others are limited to 65,535 programs.
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows x stride can pass 2**31 at large batches
        qb = tl.program_id(1)
        if qb < FULL_QUERY_BLOCKS:
            _query_block(
                qkv_ptr, rows_ptr, out_ptr, ent_ptr, b, qb * BLOCK_M, seq_len, first_query, skip_keys, scale_log2,
                stride_qkv_b, stride_qkv_s, stride_rows_b, stride_out_b, stride_out_s, stride_ent_b,
                HEADS, HEAD_DIM, BLOCK_M, BLOCK_N, FULL_KEY_BLOCKS, TAIL_N, OUTPUT, ENTROPY, INDEXED, IEEE,
            )  # fmt: skip
        elif TAIL_M > 0:
            _query_block(
                qkv_ptr, rows_ptr, out_ptr, ent_ptr, b, FULL_QUERY_BLOCKS * BLOCK_M, seq_len, first_query,
                skip_keys, scale_log2, stride_qkv_b, stride_qkv_s, stride_rows_b, stride_out_b, stride_out_s,
                stride_ent_b, HEADS, HEAD_DIM, TAIL_M, BLOCK_N, FULL_KEY_BLOCKS, TAIL_N,
                OUTPUT, ENTROPY, INDEXED, IEEE,
            )  # fmt: skip


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(full blocks, tail block) covering ``length`` in blocks of ``block``: the tail is the smallest power of two
    >= 16 that holds the ``length % block`` left over (0: none). 197 keys in blocks of 64: (3, 16), 208 computed,
    not 256."""
    full, left = divmod(length, block)
    return full, 0 if left == 0 else max(16, triton.next_power_of_2(left))


def _check(
    qkv: torch.Tensor,
    heads: int,
    first_query: int,
    skip_keys: int,
    output: bool,
    entropy: bool,
    rows: torch.Tensor | None = None,
) -> tuple[int, int, int]:
    """(B, S, Dh) of a valid call; ValueError naming what is wrong otherwise."""
    if rows is None:
        b, s, hd = _check_qkv(qkv, heads, None)
    else:
        if qkv.ndim != 2:
            raise ValueError(f"with rows, qkv must be a table [R, 3*H*Dh], got {tuple(qkv.shape)}")
        hd = _check_qkv(qkv[None], heads, None)[2]
        if rows.ndim != 2 or rows.dtype not in (torch.int32, torch.int64) or rows.device != qkv.device:
            raise ValueError(
                f"rows must be int32/int64 [B, S] on qkv's device ({qkv.device}), "
                f"got {rows.dtype} {tuple(rows.shape)} on {rows.device}"
            )
        # Their range is not checked here: reading it would make every env step wait for the device. The reference
        # path's indexing refuses an index out of range (IndexError); the kernel trusts its caller (the decoder).
        b, s = rows.shape
    if not 0 <= first_query <= s:
        raise ValueError(f"first_query must be in 0..{s} (the sequence length), got {first_query}")
    if skip_keys < 0:
        raise ValueError(f"skip_keys must be >= 0, got {skip_keys}")
    if not (output or entropy):
        raise ValueError("ask for the attention output, the entropy or both")
    return b, s, hd


def _kernel_refusal(seq_len: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot take this shape or dtype, or None when it can."""
    if seq_len < 1 or head_dim < 16 or head_dim & (head_dim - 1) or dtype not in _KERNEL_DTYPES:
        return (
            "entropy_attention_kernel needs >= 1 token, a head width that is a power of two >= 16 and "
            f"fp16/bf16/fp32, got S={seq_len}, Dh={head_dim}, {dtype}"
        )
    return None


class Launch(NamedTuple):
    """Launch settings of the kernel: query rows and keys per block (powers of two >= 16), warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


DEFAULT_LAUNCH = Launch(64, 64, 4, 3)  # 3 stages: Triton's default on NVIDIA GPUs
# Launch settings by (sequence length S, head width Dh, dtype) where a GPU sweep found better ones than
# DEFAULT_LAUNCH (``python benchmarks/env_kernels.py entropy`` times the candidates on the decoder's shapes and
# prints the entries to put here). Small batches keep BLOCK_M: lowering it until every SM had two programs was
# slower at every batch from 1 to 256 on the 14x14 and 28x28 grids (up to 1.7x; benchmarks/RESULTS.md 9.7).
LAUNCHES: dict[tuple[int, int, torch.dtype], Launch] = {}


def _launch(seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> Launch:
    """:data:`LAUNCHES`' settings for the shape (else :data:`DEFAULT_LAUNCH`); under Triton's interpreter (no SMs)
    BLOCK_M 16, with which it runs fastest."""
    launch = LAUNCHES.get((seq_len, head_dim, dtype), DEFAULT_LAUNCH)
    return launch._replace(block_m=16) if sm_count(device) is None else launch


def entropy_attention_kernel(
    qkv: torch.Tensor,
    heads: int,
    *,
    first_query: int = 0,
    skip_keys: int = 1,
    output: bool = True,
    entropy: bool = True,
    rows: torch.Tensor | None = None,
    launch: Launch | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Softmax attention of the query rows ``first_query..S-1`` over all S keys, and the entropy of each
    query row's attention summed over heads, by the Triton kernel (no autograd; no attention map written).

    Args:
        qkv: [B, S, 3*H*Dh], last axis ordered (3, H, Dh) as timm's ``Attention.qkv`` gives it; Dh a power of
            two >= 16; fp16, bf16 or fp32 (every product accumulates in fp32; fp32 inputs get exact fp32
            products, not TF32).
        heads: H.
        first_query: rows before it are keys only.
        skip_keys: the first ``skip_keys`` keys stay in the softmax's normaliser but out of the entropy sum
            (1: AME's "every key but CLS").
        output, entropy: which results to compute (at least one).
        rows: int32/int64 [B, S], or None. Given, ``qkv`` is a table [R, 3*H*Dh] of distinct rows and token s of
            sequence b is ``qkv[rows[b, s]]``: sequences that share most of their rows (the decoder's mask
            rows) are read from the table, never written out whole. The kernel does not check the indices' range.
        launch: the launch settings, as given (a sweep's candidates); None: :func:`_launch`'s choice by shape
            and batch.

    Returns:
        out: [B, Q, H*Dh] in qkv's dtype (heads side by side, ready for the output projection), or None;
        entropy: float32 [B, Q], ``sum_h sum_{j >= skip_keys} -p_hj log2 p_hj`` in bits (0 where no key is
        summed), or None.
    """
    if triton is None:
        raise RuntimeError("entropy_attention_kernel needs Triton (it ships with PyTorch's CUDA wheels)")
    b, s, hd = _check(qkv, heads, first_query, skip_keys, output, entropy, rows)
    refusal = _kernel_refusal(s, hd, qkv.dtype)
    if refusal:
        raise ValueError(refusal)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if rows is not None and rows.stride(-1) != 1:
        rows = rows.contiguous()
    # Strides of the sequences: (row, token) of qkv itself, or (table row) and rows' row stride when indexed.
    stride_b, stride_s = (qkv.stride(0), qkv.stride(1)) if rows is None else (0, qkv.stride(0))
    n_q = s - first_query
    out = torch.empty(b, n_q, heads * hd, device=qkv.device, dtype=qkv.dtype) if output else None
    ent = torch.empty(b, n_q, device=qkv.device, dtype=torch.float32) if entropy else None
    if n_q == 0:
        return out, ent
    launch = launch or _launch(s, hd, qkv.dtype, qkv.device)
    for name, block in (("block_m", launch.block_m), ("block_n", launch.block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"launch.{name} must be a power of two >= 16, got {block}")
    out_arg = out if out is not None else qkv  # never touched when its flag is off
    ent_arg = ent if ent is not None else qkv
    full_keys, tail_n = _blocks(s, launch.block_n)
    full_queries, tail_m = _blocks(n_q, launch.block_m)
    _entropy_attention_kernel[(b, full_queries + (tail_m > 0))](
        qkv,
        rows if rows is not None else qkv,  # never read when not INDEXED
        out_arg,
        ent_arg,
        s,
        first_query,
        skip_keys,
        hd**-0.5 * _LOG2E,
        stride_b,
        stride_s,
        rows.stride(0) if rows is not None else 0,
        out.stride(0) if out is not None else 0,
        out.stride(1) if out is not None else 0,
        ent.stride(0) if ent is not None else 0,
        HEADS=heads,
        HEAD_DIM=hd,
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        FULL_KEY_BLOCKS=full_keys,
        TAIL_N=tail_n,
        FULL_QUERY_BLOCKS=full_queries,
        TAIL_M=tail_m,
        OUTPUT=output,
        ENTROPY=entropy,
        INDEXED=rows is not None,
        IEEE=qkv.dtype == torch.float32,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return out, ent


# ------------------------------------------------------------------------------------- the reference
def reference_entropy_attention(
    qkv: torch.Tensor,
    heads: int,
    *,
    first_query: int = 0,
    skip_keys: int = 1,
    output: bool = True,
    entropy: bool = True,
    rows: torch.Tensor | None = None,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What :func:`entropy_attention_kernel` computes, in PyTorch (any device, any length, autograd).

    The decoder's own arithmetic: scores ``(q * Dh^-0.5) @ k^T`` in qkv's dtype, softmax and ``-p ln p``
    (0 at p = 0) in float32, summed and divided by ln 2. Query rows go in chunks of at most
    ``chunk_elements`` probabilities ([B, H, rows, S]), so the whole map never exists at once. Output alone
    is one fused ``scaled_dot_product_attention``.

    Args and returns as :func:`entropy_attention_kernel` (``chunk_elements`` aside; with ``rows`` the
    sequences are gathered from the table first).
    """
    b, s, hd = _check(qkv, heads, first_query, skip_keys, output, entropy, rows)
    if rows is not None:
        qkv = qkv[rows]  # [B, S, 3*H*Dh]
    q, k, v = qkv.view(b, s, 3, heads, hd).permute(2, 0, 3, 1, 4)  # each [B, H, S, Dh]
    q = q[:, :, first_query:]
    n_q = s - first_query
    if not entropy:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n_q, heads * hd), None
    chunk = max(1, chunk_elements // max(1, b * heads * s))  # query rows per chunk
    outs, ents = [], []
    for start in range(0, n_q, chunk):
        scores = (q[:, :, start : start + chunk] * hd**-0.5) @ k.transpose(-2, -1)  # [B, H, rows, S]
        attn = scores.softmax(dim=-1, dtype=torch.float32)  # fp32 straight from the scores: no upcast pass
        ents.append(torch.special.entr(attn[..., skip_keys:]).sum(dim=(1, 3)))  # [B, rows], nats
        if output:
            outs.append(attn.to(v.dtype) @ v)
    ent = (ents[0] if len(ents) == 1 else torch.cat(ents, dim=1)) / math.log(2.0)
    if not output:
        return None, ent
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).reshape(b, n_q, heads * hd), ent


# -------------------------------------------------------------------------------------------- dispatch
def entropy_attention(
    qkv: torch.Tensor,
    heads: int,
    *,
    first_query: int = 0,
    skip_keys: int = 1,
    output: bool = True,
    entropy: bool = True,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`entropy_attention_kernel` where it can run (Triton, CUDA or the interpreter, no autograd, a
    shape and dtype it takes, ``AVEX_ENTROPY_KERNEL`` not ``0``), else :func:`reference_entropy_attention`;
    if the kernel fails to build or launch here, the reference from then on, with one warning.

    Args and returns as :func:`entropy_attention_kernel`.
    """
    b, s, hd = _check(qkv, heads, first_query, skip_keys, output, entropy, rows)

    def reference() -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return reference_entropy_attention(
            qkv, heads, first_query=first_query, skip_keys=skip_keys, output=output, entropy=entropy, rows=rows
        )

    usable = (
        entropy  # output alone: PyTorch's fused SDPA already writes no map
        and os.environ.get(ENTROPY_KERNEL_ENV, "1") != "0"
        and _kernel_may_run(qkv)
        and _kernel_refusal(s, hd, qkv.dtype) is None
    )
    if not usable:
        return reference()
    return kernel_or_fallback(
        "entropy attention",
        lambda: entropy_attention_kernel(
            qkv, heads, first_query=first_query, skip_keys=skip_keys, output=output, entropy=entropy, rows=rows
        ),
        reference,
        "the decoder's attention entropy now uses PyTorch, with the same results but slower (and its "
        f"attention map in memory). Fix the Triton install or set {ENTROPY_KERNEL_ENV}=0 to skip the kernel.",
    )
