"""The glimpse decoder's table of distinct rows, placed and normed in one pass: what its entropy map projects.

An env step's entropy map needs the first decoder block's norm of each distinct row of the decoder's input
(:mod:`avex.decoder_index` orders them: the B CLS rows, the B * L observed tokens each plus its cell's position,
the N mask rows, the mask token plus each cell's position). PyTorch's ops build that from the embedded sequence
in five passes (a gather of positions, two additions, a concatenation, the norm), after a copy of the tokens out
of the encoder's sequence; :func:`normed_table_kernel` reads the embedded sequence in place and writes the normed
table once. At a TORE benchmark's few hundred rows each of those passes is a few microseconds of fixed cost.

Two functions, same arithmetic (each sum rounded to the table's dtype once, as PyTorch's addition, then the norm in
fp32): :func:`reference_normed_table` (PyTorch, any device) and :func:`normed_table_kernel` (Triton: one launch).
:func:`normed_table` picks the kernel where it applies.

Shapes: B rows, S = P + L tokens of the encoder's sequence (P prefix tokens, CLS first, then L observed tokens),
N grid cells, d the decoder's width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from avex.kernel_fallback import kernel_or_fallback, triton
from avex.layer_norm import _row_blocks, norm_applies, norm_forward

if triton is not None:
    import triton.language as tl

    from avex.layer_norm import _normalize_rows

__all__ = ["normed_table", "normed_table_kernel", "reference_normed_table", "table_rows"]


if triton is not None:

    @triton.jit
    def _normed_table_kernel(
        emb_ptr,
        cell_ptr,
        pos_ptr,
        mask_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        batch,
        n_obs,
        n_rows,
        prefix,
        stride_eb,
        stride_es,
        N,
        eps,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # BLOCK_M table rows per program. Row r < B: CLS of sequence r (emb[r, 0]); B <= r < B + B * L: token l of
        # sequence b (emb[b, P + l] + pos[cell[b, l]], i = r - B = b * L + l); later rows: the mask token plus the
        # position of cell r - B - B * L. Each sum rounded to the output's dtype once, then normed in fp32.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < n_rows, cols < N
        rows64 = rows.to(tl.int64)  # 64-bit offsets: the table passes 2**31 elements at large batches
        n_tok = batch * n_obs
        head = rows64 < batch
        tok = (rows64 >= batch) & (rows64 < batch + n_tok)
        i = tl.where(tok, rows64 - batch, 0)
        per = tl.maximum(n_obs, 1)
        src = tl.where(head, rows64 * stride_eb, (i // per) * stride_eb + (prefix + i % per) * stride_es)
        from_emb = (head | tok) & in_rows
        x = tl.load(emb_ptr + src[:, None] + cols[None, :], mask=from_emb[:, None] & in_cols[None, :], other=0.0)
        m = tl.load(mask_ptr + cols, mask=in_cols, other=0.0)
        x = tl.where(from_emb[:, None], x.to(tl.float32), m.to(tl.float32)[None, :])
        cell = tl.load(cell_ptr + i, mask=tok & in_rows, other=0)
        placed = (~head) & in_rows
        pos_row = tl.where(tok, cell, rows64 - batch - n_tok)
        p = tl.load(pos_ptr + pos_row[:, None] * N + cols[None, :], mask=placed[:, None] & in_cols[None, :], other=0.0)
        z = (x + p.to(tl.float32)).to(out_ptr.dtype.element_ty).to(tl.float32)  # the CLS rows add 0: unchanged
        mask = in_rows[:, None] & in_cols[None, :]
        y, _, _ = _normalize_rows(tl.where(mask, z, 0.0), mask, w_ptr, b_ptr, cols, in_cols, N, eps)
        tl.store(out_ptr + rows64[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(emb: torch.Tensor, prefix: int, cell: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> None:
    """ValueError naming the argument of a call whose shapes do not fit together."""
    if emb.ndim != 3 or not 1 <= prefix <= emb.shape[1]:
        raise ValueError(f"emb must be [B, S, d] with 1 <= prefix <= S, got {tuple(emb.shape)} and prefix={prefix}")
    b, s, d = emb.shape
    if cell.shape != (b, s - prefix) or cell.dtype != torch.long:
        raise ValueError(f"cell must be int64 [B, L] = [{b}, {s - prefix}], got {cell.dtype} {tuple(cell.shape)}")
    if pos.ndim != 2 or pos.shape[1] != d or mask.shape != (d,):
        raise ValueError(f"pos must be [N, {d}] and mask [{d}], got {tuple(pos.shape)} and {tuple(mask.shape)}")


def table_rows(
    head: torch.Tensor, seen: torch.Tensor, cell: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The decoder's table of distinct rows in :mod:`avex.decoder_index`'s order, by PyTorch's ops: [B + B * L + N, d]
    from head [B, d] (the embedded CLS tokens), seen [B, L, d] (the embedded observed tokens, each plus its cell's
    position here), cell int64 [B, L], pos [N, d] and mask [d] (plus each cell's position)."""
    return torch.cat([head, (seen + pos[cell]).reshape(-1, seen.shape[-1]), mask + pos])


def reference_normed_table(
    emb: torch.Tensor, prefix: int, cell: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, norm: nn.Module
) -> torch.Tensor:
    """The decoder's table of distinct rows, normed.

    Args:
        emb: [B, S, d] the encoder's sequence embedded to the decoder's width (CLS first, observed tokens from
            ``prefix`` on).
        prefix: P, the sequence's prefix tokens (only the first, CLS, enters the table).
        cell: int64 [B, L] each observed token's grid cell (:func:`avex.decoder_index.sequence_index`).
        pos: [N, d] each cell's position. mask: [d] the mask token. norm: the first decoder block's norm.

    Returns:
        ``norm(table)``: [B + B * L + N, d], the table in :mod:`avex.decoder_index`'s order.
    """
    _check(emb, prefix, cell, pos, mask)
    return norm_forward(norm, table_rows(emb[:, 0], emb[:, prefix:], cell, pos, mask))


def normed_table_kernel(
    emb: torch.Tensor, prefix: int, cell: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, norm: nn.Module
) -> torch.Tensor:
    """:func:`reference_normed_table` by the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``): ``emb``
    read in place (rows of unit stride), the table written once. ``norm`` a plain affine LayerNorm in emb's dtype."""
    if triton is None:
        raise RuntimeError("normed_table_kernel needs Triton (it ships with PyTorch's CUDA wheels)")
    _check(emb, prefix, cell, pos, mask)
    ln = norm
    assert isinstance(ln, nn.LayerNorm) and ln.weight is not None and ln.bias is not None
    b, s, d = emb.shape
    if emb.stride(-1) != 1:
        emb = emb.contiguous()
    n_rows = b + b * (s - prefix) + pos.shape[0]
    out = torch.empty(n_rows, d, dtype=emb.dtype, device=emb.device)
    block_n, block_m = _row_blocks(d, 4096)
    _normed_table_kernel[(triton.cdiv(n_rows, block_m),)](
        emb, cell.contiguous(), pos.contiguous(), mask.contiguous(), ln.weight, ln.bias, out, b, s - prefix, n_rows,
        prefix, emb.stride(0), emb.stride(1), d, float(ln.eps), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out


def normed_table(
    emb: torch.Tensor, prefix: int, cell: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, norm: nn.Module
) -> torch.Tensor:
    """:func:`normed_table_kernel` where the norm's kernel applies (:func:`avex.layer_norm.norm_applies`: CUDA or
    the interpreter, no autograd, a plain LayerNorm in emb's dtype, enough rows or a CUDA graph being captured), else
    :func:`reference_normed_table`; if the kernel fails to build or launch here, the reference from then on, with one
    warning. Args and returns as :func:`reference_normed_table`."""
    if not norm_applies(norm, emb) or pos.dtype != emb.dtype or mask.dtype != emb.dtype:
        return reference_normed_table(emb, prefix, cell, pos, mask, norm)
    return kernel_or_fallback(
        "decoder table",
        lambda: normed_table_kernel(emb, prefix, cell, pos, mask, norm),
        lambda: reference_normed_table(emb, prefix, cell, pos, mask, norm),
        "the decoder's table now uses PyTorch's ops, with the same results but slower.",
    )
