"""The training decoder's input sequence in one pass each way.

The fused step's decoder reads ``[B, 1 + L + M, dd]``: row 0 the embedded CLS token, rows 1..L the embedded seen
tokens plus the sin-cos position of their cell, then the mask token plus the position of each of the M unseen cells.
As PyTorch ops that is two gathers from the position table, two adds and a concatenation forward, and, backward,
copies of the two slices that the embedding's and the mask token's gradients read, then a column sum for the mask
token. Here one Triton pass writes the sequence, and one pass over its gradient writes the embedding's gradient
and per-program column sums of the mask rows (the mask token's gradient, summed once by
:func:`~avex.train.rows.sum_partials`). The position table is a fixed buffer: it gets no gradient. Each row is one
add in fp32 rounded once, as PyTorch's add in the compute dtype: the sequence equals the PyTorch ops' bit for bit.
Where Triton cannot run, those ops.

Shapes: B batch, L seen tokens, M unseen cells, S = 1 + L + M, N grid cells, dd the decoder's width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from avex.kernel_fallback import _device_may_run, sm_count, triton
from avex.layer_norm import _row_blocks
from avex.train.kernels import _works
from avex.train.rows import row_blocks, sum_partials, train_add_row

if triton is not None:
    import triton.language as tl

__all__ = ["decoder_input"]

if triton is not None:

    @triton.jit
    def _decoder_input_fwd_kernel(
        e_ptr,
        cells_ptr,
        unseen_ptr,
        pos_ptr,
        mask_ptr,
        out_ptr,
        R,
        S,
        L,
        M,
        D,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # BLOCK_M of the R = B * S rows of the contiguous [B, S, D] output per program; row (b, s) reads e[b, s]
        # (s <= L) or the mask token, plus pos[cell] (s >= 1: the seen cell cells[b, s - 1] or the unseen cell
        # unseen[b, s - 1 - L]).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < R, cols < D
        rows64 = rows.to(tl.int64)  # 64-bit offsets: rows x D passes 2**31 at large batches
        b, s = rows64 // S, rows64 % S
        is_e = in_rows & (s <= L)
        seen = is_e & (s >= 1)
        hidden = in_rows & (s > L)
        cell = tl.load(cells_ptr + b * L + s - 1, mask=seen, other=0)
        cell = tl.where(hidden, tl.load(unseen_ptr + b * M + s - 1 - L, mask=hidden, other=0), cell)
        cols2 = in_cols[None, :]
        pos = tl.load(pos_ptr + cell[:, None] * D + cols[None, :], mask=(seen | hidden)[:, None] & cols2, other=0.0)
        e = tl.load(e_ptr + (b * (L + 1) + s)[:, None] * D + cols[None, :], mask=is_e[:, None] & cols2, other=0.0)
        token = tl.load(mask_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
        out = tl.where(is_e[:, None], e.to(tl.float32), token[None, :]) + pos.to(tl.float32)
        offs = rows64[:, None] * D + cols[None, :]
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=in_rows[:, None] & cols2)

    @triton.jit
    def _decoder_input_bwd_kernel(
        dout_ptr,
        de_ptr,
        partial_ptr,
        R,
        S,
        L,
        D,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CHUNKS: tl.constexpr,
    ):
        # Program p takes rows [p * CHUNKS * BLOCK_M, (p + 1) * CHUNKS * BLOCK_M) of the contiguous [B, S, D] gradient:
        # rows s <= L go to de [B, 1 + L, D]; the mask rows' fp32 sums per tile element, summed over the tile's rows
        # once at the end, into partial[p, :].
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        in_cols = cols < D
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(CHUNKS):
            rows = (pid * CHUNKS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            in_rows = rows < R
            rows64 = rows.to(tl.int64)
            b, s = rows64 // S, rows64 % S
            is_e = in_rows & (s <= L)
            cols2 = in_cols[None, :]
            g = tl.load(dout_ptr + rows64[:, None] * D + cols[None, :], mask=in_rows[:, None] & cols2, other=0.0)
            tl.store(de_ptr + (b * (L + 1) + s)[:, None] * D + cols[None, :], g, mask=is_e[:, None] & cols2)
            acc += tl.where((in_rows & (s > L))[:, None], g.to(tl.float32), 0.0)
        tl.store(partial_ptr + pid * D + cols, tl.sum(acc, axis=0), mask=in_cols)


class _DecoderInput(torch.autograd.Function):
    """:func:`decoder_input` by the Triton kernels."""

    @staticmethod
    def forward(
        ctx: Any, e: torch.Tensor, mask: torch.Tensor, cells: torch.Tensor, unseen: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        b, l1, d = e.shape
        m = unseen.shape[1]
        s = l1 + m
        e, cells, unseen, pos = e.contiguous(), cells.contiguous(), unseen.contiguous(), pos.contiguous()
        out = e.new_empty(b, s, d)
        block_n, block_m = _row_blocks(d, 4096)
        if b * s:
            _decoder_input_fwd_kernel[(triton.cdiv(b * s, block_m),)](
                e, cells, unseen, pos, mask.reshape(-1), out, b * s, s, l1 - 1, m, d, BLOCK_M=block_m, BLOCK_N=block_n
            )
        ctx.mask_shape, ctx.e_shape = mask.shape, e.shape
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        b, l1, d = ctx.e_shape
        dout = dout.contiguous()
        s = dout.shape[1]
        de = dout.new_empty(b, l1, d)
        block_n, block_m, chunks, programs, warps = row_blocks("column_sum", b * s, d, sm_count(dout.device))
        partial = torch.empty(programs, d, dtype=torch.float32, device=dout.device)
        if programs:
            _decoder_input_bwd_kernel[(programs,)](
                dout, de, partial, b * s, s, l1 - 1, d, BLOCK_M=block_m, BLOCK_N=block_n, CHUNKS=chunks, num_warps=warps
            )
        return de, sum_partials(partial, dout.dtype).view(ctx.mask_shape), None, None, None


def decoder_input(
    e: torch.Tensor, cells: torch.Tensor, unseen: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The decoder's input ``[e[:, :1], e[:, 1:] + pos[cells], mask + pos[unseen]]`` with autograd (e's and the mask
    token's gradients), by one Triton pass each way on CUDA (or Triton's interpreter), PyTorch's ops elsewhere.

    Args:
        e: [B, 1 + L, dd] the embedded CLS and seen tokens.
        cells: [B, L] int64, each seen token's grid cell. unseen: [B, M] int64, the unseen cells.
        pos: [N, dd] the position table (no gradient). mask: the mask token, dd elements (any shape).

    Returns:
        [B, 1 + L + M, dd] in e's dtype.
    """
    if cells.shape != (e.shape[0], e.shape[1] - 1) or unseen.shape[0] != e.shape[0]:
        raise ValueError(
            f"decoder_input: e [B, 1 + L, dd], cells [B, L] and unseen [B, M], got {tuple(e.shape)}, "
            f"{tuple(cells.shape)} and {tuple(unseen.shape)}"
        )
    takes = _device_may_run(e) and e.dtype == pos.dtype == mask.dtype and not pos.requires_grad
    if takes and mask.numel() == e.shape[-1] == pos.shape[-1] and _works("decoder input", e, _decoder_input_trial):
        out: torch.Tensor = _DecoderInput.apply(e, mask, cells, unseen, pos)
        return out
    return _decoder_input_torch(e, cells, unseen, pos, mask)


def _decoder_input_torch(
    e: torch.Tensor, cells: torch.Tensor, unseen: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """What the kernels compute, by PyTorch's ops."""
    masked = train_add_row(F.embedding(unseen, pos), mask)
    return torch.cat([e[:, :1], e[:, 1:] + F.embedding(cells, pos), masked], 1)


def _decoder_input_trial(x: torch.Tensor) -> torch.Tensor:
    # x [2, 5, 48]: CLS and 4 seen tokens per row, 3 unseen cells of a 9-cell table.
    cells = torch.arange(8, device=x.device).view(2, 4) % 9
    unseen = torch.arange(6, device=x.device).view(2, 3)
    pos = torch.linspace(0.0, 1.0, 9 * 48, device=x.device).view(9, 48).to(x.dtype)
    return _DecoderInput.apply(x, x[0, 0] * 0.5, cells, unseen, pos)
