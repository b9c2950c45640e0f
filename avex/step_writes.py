"""A TORE step's small writes, each in one Triton pass: a glimpse's tokens placed (:func:`place_tokens`) and cached
(:func:`append_glimpse`).

Between the matrix products, a step writes a few small tensors: the iterator's input (the prefix tokens with their
positions, each glimpse token plus the position embedding of its cell) and, after the iterator, the cache's new
slots (the tokens, their coordinates, the prefix's running mean). In PyTorch's ops that is four and three launches
of a few microseconds each, paid at every step whatever the batch (the half of a K=12 step at batch 256 that is
what it costs at batch 1, benchmarks/RESULTS.md 9.4). Each function here is one launch with the ops' arithmetic
(each sum rounded to the output's dtype once; the running mean as ``torch.lerp``'s); its caller keeps the ops as
the CPU path and the fallback (:mod:`avex.embedding`, :mod:`avex.cache`).

Shapes: B rows, P prefix tokens, G tokens per glimpse, D width, N grid cells.
"""

from __future__ import annotations

import torch

from avex.kernel_fallback import triton
from avex.layer_norm import _row_blocks

if triton is not None:
    import triton.language as tl

__all__ = ["append_glimpse", "place_tokens"]

if triton is not None:

    @triton.jit
    def _glimpse_rows(n_rows, P, G, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's BLOCK_M rows of a [B, P + G, D] glimpse sequence: (64-bit row index, column index, row and
        column in range, b, j, j < P (a prefix row), the token index j - P, 0 for prefix rows)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        b, j = rows64 // (P + G), rows64 % (P + G)
        pre = j < P
        return rows64, cols, rows < n_rows, cols < D, b, j, pre, tl.where(pre, 0, j - P)

    @triton.jit
    def _place_tokens_kernel(
        x_ptr,
        coords_ptr,
        table_ptr,
        prefix_ptr,
        prefix_pos_ptr,
        out_ptr,
        n_rows,
        P,
        G,
        D,
        GW,
        stride_cb,
        stride_cg,
        HAS_PREFIX_POS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # BLOCK_M rows of out [B, P + G, D] per program: row (b, j) is prefix[j] (+ prefix_pos[j]) for j < P, else
        # x[b, j - P] + table[row * GW + col] of that token's coordinates.
        rows64, cols, in_rows, in_cols, b, j, pre, g = _glimpse_rows(n_rows, P, G, D, BLOCK_M, BLOCK_N)
        tok = in_rows & ~pre
        at = coords_ptr + b * stride_cb + g * stride_cg
        cell = tl.load(at, mask=tok, other=0).to(tl.int64) * GW + tl.load(at + 1, mask=tok, other=0).to(tl.int64)
        mask_t = tok[:, None] & in_cols[None, :]
        mask_p = (in_rows & pre)[:, None] & in_cols[None, :]
        x = tl.load(x_ptr + (b * G + g)[:, None] * D + cols[None, :], mask=mask_t, other=0.0).to(tl.float32)
        x += tl.load(table_ptr + cell[:, None] * D + cols[None, :], mask=mask_t, other=0.0).to(tl.float32)
        jp = tl.where(pre, j, 0)
        p = tl.load(prefix_ptr + jp[:, None] * D + cols[None, :], mask=mask_p, other=0.0).to(tl.float32)
        if HAS_PREFIX_POS:
            p += tl.load(prefix_pos_ptr + jp[:, None] * D + cols[None, :], mask=mask_p, other=0.0).to(tl.float32)
        out = tl.where(pre[:, None], p, x)
        mask = in_rows[:, None] & in_cols[None, :]
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _append_kernel(
        x_ptr,
        coords_ptr,
        buf_ptr,
        cbuf_ptr,
        n_rows,
        P,
        G,
        D,
        first_slot,
        weight,
        stride_bb,
        stride_cbb,
        stride_cb,
        stride_cg,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # BLOCK_M rows of x [B, P + G, D] per program: a prefix row (j < P) into buf[b, j] as torch.lerp(buf, x,
        # weight); a token row into buf[b, P + first_slot + j - P] and its coordinates, as float, into
        # cbuf[b, first_slot + j - P].
        rows64, cols, in_rows, in_cols, b, j, pre, g = _glimpse_rows(n_rows, P, G, D, BLOCK_M, BLOCK_N)
        mask = in_rows[:, None] & in_cols[None, :]
        x = tl.load(x_ptr + rows64[:, None] * D + cols[None, :], mask=mask, other=0.0)
        dst = b * stride_bb + tl.where(pre, j, first_slot + j)  # a token's slot: P + first_slot + (j - P)
        old = tl.load(buf_ptr + dst[:, None] * D + cols[None, :], mask=mask & pre[:, None], other=0.0)
        a, e = old.to(tl.float32), x.to(tl.float32)
        # torch.lerp's two forms (ATen's lerp): from the start below a weight of 0.5, from the end above.
        mean = tl.where(weight < 0.5, a + weight * (e - a), e - (e - a) * (1.0 - weight))
        tl.store(buf_ptr + dst[:, None] * D + cols[None, :], tl.where(pre[:, None], mean, e).to(x.dtype), mask=mask)
        tok = in_rows & ~pre
        for axis in tl.static_range(2):
            c = tl.load(coords_ptr + b * stride_cb + g * stride_cg + axis, mask=tok, other=0).to(tl.float32)
            tl.store(cbuf_ptr + b * stride_cbb + (first_slot + g) * 2 + axis, c, mask=tok)  # stride in elements


def place_tokens(
    x: torch.Tensor,
    coords: torch.Tensor,
    table: torch.Tensor,
    prefix: torch.Tensor,
    prefix_pos: torch.Tensor | None,
    grid_w: int,
) -> torch.Tensor:
    """The iterator's input ``[prefix (+ its positions), x + table[cell]]`` in one pass (CUDA, or CPU under Triton's
    interpreter; no autograd).

    Args:
        x: [B, G, D] the glimpse's projected patches. coords: integer [B, G, 2] their (row, col) on the grid.
        table: [N, D] the position embedding of every cell, row-major, ``grid_w`` cells a row.
        prefix: [P, D] the prefix tokens; prefix_pos: [P, D] their position embedding, or None.

    Returns:
        [B, P + G, D] in x's dtype: each row one sum in fp32, rounded once (as ``torch.add`` of two such tensors).
    """
    if triton is None:
        raise RuntimeError("place_tokens needs Triton (it ships with PyTorch's CUDA wheels)")
    b, g, d = x.shape
    p = prefix.shape[0]
    if coords.shape != (b, g, 2) or coords.is_floating_point() or table.shape[1] != d or prefix.shape[1] != d:
        raise ValueError(
            f"place_tokens needs x [B, G, D], integer coords [B, G, 2], table [N, D] and prefix [P, D]; got "
            f"{tuple(x.shape)}, {coords.dtype} {tuple(coords.shape)}, {tuple(table.shape)}, {tuple(prefix.shape)}"
        )
    if coords.stride(-1) != 1:  # the kernel reads a token's (row, col) as two neighbours
        coords = coords.contiguous()
    out = torch.empty(b, p + g, d, dtype=x.dtype, device=x.device)
    n_rows = b * (p + g)
    if n_rows:
        block_n, block_m = _row_blocks(d, 4096)  # a tile of about 4,096 elements, as the layer norm's
        _place_tokens_kernel[(triton.cdiv(n_rows, block_m),)](
            x.contiguous(), coords, table.contiguous(), prefix.contiguous(),
            prefix if prefix_pos is None else prefix_pos.contiguous(), out, n_rows, p, g, d, grid_w,
            coords.stride(0), coords.stride(1), HAS_PREFIX_POS=prefix_pos is not None, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
    return out


def append_glimpse(
    buf: torch.Tensor, cbuf: torch.Tensor, x: torch.Tensor, coords: torch.Tensor, prefix: int, first_slot: int
) -> None:
    """One glimpse per row into a TORE cache whose rows hold the same number of glimpses, in one pass (CUDA, or CPU
    under Triton's interpreter; no autograd): the G tokens into slots ``first_slot`` on, their coordinates as float,
    the P prefix rows into the running mean (``lerp`` with weight ``1 / (first_slot / G + 1)``).

    Args:
        buf: [B, P + capacity * G, D] (rows of unit feature stride, contiguous within a row). cbuf: float32
            [B, capacity * G, 2], contiguous within a row.
        x: [B, P + G, D] the iterator's output in buf's dtype. coords: [B, G, 2] (any number type).
        prefix: P. first_slot: the first token slot to write (G times the glimpses held).
    """
    if triton is None:
        raise RuntimeError("append_glimpse needs Triton (it ships with PyTorch's CUDA wheels)")
    b, s, d = x.shape
    g = s - prefix
    if (
        buf.dtype != x.dtype
        or buf.stride(2) != 1
        or buf.stride(1) != d
        or buf.stride(0) % d
        or cbuf.stride(2) != 1
        or cbuf.stride(1) != 2
    ):
        raise ValueError("append_glimpse needs x in buf's dtype and rows of buf and cbuf contiguous within a row")
    if coords.stride(-1) != 1:
        coords = coords.contiguous()
    held = first_slot // g
    n_rows = b * s
    if n_rows:
        block_n, block_m = _row_blocks(d, 4096)  # a tile of about 4,096 elements, as the layer norm's
        _append_kernel[(triton.cdiv(n_rows, block_m),)](
            x.contiguous(), coords, buf, cbuf, n_rows, prefix, g, d, first_slot, 1.0 / (held + 1),
            buf.stride(0) // d, cbuf.stride(0), coords.stride(0), coords.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
