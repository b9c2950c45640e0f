"""The iterator's input sequence as one matrix product: glimpse pixels, positions, prefix tokens and bias together.

The fused step's iterator reads ``[B*T, P + G, D]``: per glimpse the P prefix tokens (CLS and registers, plus their
position rows where the ViT adds them), then its G patch tokens ``W x + b + pos[cell]``. As PyTorch ops that was a
permuted copy of the canvases, a gather of the glimpses' patches, their normalisation, the product, the add of the
gathered position rows and a concatenation with the prefix forward; backward a slice copy of the tokens' gradient, a
column sum for the bias, a scatter-add of fp32 atomics into the position table (about 400 rows of the batch per cell)
and a sum for the prefix.

Here every row of the sequence is one row of a wider input, ``[pixels | one-hot cell | one-hot prefix slot | 1 |
0...]``, written by one Triton pass straight from the canvases (:func:`glimpse_rows`), times one weight matrix, ``[W |
pos^T | prefix^T | b | 0...]`` (:func:`glimpse_weight`): the product is the sequence, and its weight gradient ``dy^T
rows`` is, column block by column block, the gradients of W, of each position row, of the prefix tokens and of the
bias, each summed over the batch by the product's fp32 accumulation (deterministic, no atomics). A token's value is
``W x + b + pos`` summed in fp32 and rounded once. The rows need no gradient. Where Triton cannot run, PyTorch's ops
write the same rows.

Shapes: B batch, T glimpses, G = g*g tokens per glimpse, L = T*G, P prefix tokens, N grid cells, Cpp = C*p*p pixels
per patch (channel-major, the patch projection's order), D width, K = :func:`glimpse_width`.
"""

from __future__ import annotations

import torch

from avex.kernel_fallback import _device_may_run, triton
from avex.train.kernels import _works

if triton is not None:
    import triton.language as tl

__all__ = ["gather_patches", "glimpse_rows", "glimpse_weight", "glimpse_width"]

_ALIGN = 16  # columns: rows of 32 bytes in bf16, as the matrix products' and the kernel's vectorised accesses want


def glimpse_width(cpp: int, n_cells: int, n_prefix: int) -> int:
    """K, the columns of a row of :func:`glimpse_rows`: Cpp pixels, N cells, P prefix slots and the bias's 1, padded
    to a multiple of 16."""
    return -(-(cpp + n_cells + n_prefix + 1) // _ALIGN) * _ALIGN


if triton is not None:

    @triton.jit
    def _glimpse_rows_kernel(
        canvas_ptr,
        cells_ptr,
        scale_ptr,
        shift_ptr,
        out_ptr,
        R,
        T,
        L,
        PG,
        P,
        HWC,
        WC,
        C,
        GW,
        CPP,
        NCELLS,
        K,
        PATCH: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # BLOCK_M of the R = B*T*(P + G) rows of the zeroed output per program; only what is not 0 is written. Row
        # (glimpse b*T + t, slot s): s < P a prefix row, a 1 in column Cpp + N + s; else the token of cell
        # cells[b, t*G + s - P]: its Cpp pixels normalised, a 1 in column Cpp + cell and one in the bias's, Cpp + N + P.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        in_rows = rows < R
        glimpse, slot = rows // PG, rows % PG
        b, t = glimpse // T, glimpse % T
        token = in_rows & (slot >= P)
        cell = tl.load(cells_ptr + b.to(tl.int64) * L + t * (PG - P) + slot - P, mask=token, other=0).to(tl.int32)
        row = out_ptr + rows.to(tl.int64) * K  # 64-bit offsets: R x K passes 2**31 at large batches
        one = tl.full([BLOCK_M], 1.0, out_ptr.dtype.element_ty)
        tl.store(row + tl.where(token, CPP + cell, CPP + NCELLS + slot), one, mask=in_rows)
        tl.store(row + CPP + NCELLS + P, one, mask=token)
        cols = tl.arange(0, BLOCK_C)
        is_pix = cols < CPP
        ch, py, px = cols // (PATCH * PATCH), (cols // PATCH) % PATCH, cols % PATCH  # channel-major columns
        corner = b.to(tl.int64) * HWC + (cell // GW) * PATCH * WC + (cell % GW) * PATCH * C
        mask = token[:, None] & is_pix[None, :]
        pix = tl.load(canvas_ptr + corner[:, None] + (py * WC + px * C + ch)[None, :], mask=mask, other=0)
        scale = tl.load(scale_ptr + cols, mask=is_pix, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=is_pix, other=0.0)
        val = shift[None, :] + pix.to(tl.float32) * scale[None, :]
        tl.store(row[:, None] + cols[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


def _check(canvases: torch.Tensor, cells: torch.Tensor, t: int, patch: int, n_prefix: int) -> None:
    if canvases.dtype != torch.uint8 or canvases.dim() != 4:
        raise ValueError(
            f"glimpse_rows: canvases must be uint8 [B, H, W, C], got {canvases.dtype} {tuple(canvases.shape)}"
        )
    b, h, w, _ = canvases.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"glimpse_rows: patch={patch} must divide the canvases' {h}x{w}")
    if cells.dim() != 2 or cells.shape[0] != b or t < 1 or cells.shape[1] % t:
        raise ValueError(f"glimpse_rows: cells must be [B={b}, L] with L a multiple of t={t}, got {tuple(cells.shape)}")
    if n_prefix < 0:
        raise ValueError(f"glimpse_rows: n_prefix must be >= 0, got {n_prefix}")


def glimpse_rows(
    canvases: torch.Tensor,
    cells: torch.Tensor,
    t: int,
    n_prefix: int,
    patch: int,
    col_scale: torch.Tensor,
    col_shift: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The rows whose product with :func:`glimpse_weight` is the iterator's input sequence (no gradient).

    Args:
        canvases: [B, H, W, C] uint8. cells: [B, L] int64, each glimpse's G cells in a row, glimpse by glimpse
            (L = t*G). t: glimpses per image. n_prefix: P. patch: p.
        col_scale, col_shift: fp32 [Cpp], a pixel column's normalisation ``shift + pixel * scale`` (channel-major).
        dtype: the rows' dtype (the compute dtype).

    Returns:
        [B*t*(P + G), K] in ``dtype``, K = :func:`glimpse_width` (Cpp, N = the canvases' cells, P).
    """
    _check(canvases, cells, t, patch, n_prefix)
    cpp = canvases.shape[-1] * patch * patch
    if col_scale.shape != (cpp,) or col_shift.shape != (cpp,):
        raise ValueError(
            f"glimpse_rows: col_scale and col_shift must be [{cpp}] (C*p*p), got {tuple(col_scale.shape)} and "
            f"{tuple(col_shift.shape)}"
        )
    like = col_scale.new_empty(0, dtype=dtype)  # the trial runs once per device and dtype
    kernel = _device_may_run(canvases) and _works("glimpse rows", like, _glimpse_rows_trial)
    return _glimpse_rows(kernel, canvases, cells, t, n_prefix, patch, col_scale, col_shift, dtype)


def _glimpse_rows(
    kernel: bool,
    canvases: torch.Tensor,
    cells: torch.Tensor,
    t: int,
    n_prefix: int,
    patch: int,
    col_scale: torch.Tensor,
    col_shift: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`glimpse_rows` by the Triton kernel (``kernel``) or by PyTorch's ops, the same rows."""
    b, h, w, c = canvases.shape
    p, gh, gw = patch, h // patch, w // patch
    cpp, n_cells, l_ = c * p * p, gh * gw, cells.shape[1]
    g, k = l_ // t, glimpse_width(cpp, n_cells, n_prefix)
    if kernel:
        canvases, cells = canvases.contiguous(), cells.contiguous()
        r = b * t * (n_prefix + g)
        out = torch.zeros(r, k, dtype=dtype, device=canvases.device)  # a memset; the kernel writes the rest
        block_c = triton.next_power_of_2(cpp)
        block_m = max(1, 4096 // block_c)
        if r:
            _glimpse_rows_kernel[(triton.cdiv(r, block_m),)](
                canvases, cells, col_scale.float().contiguous(), col_shift.float().contiguous(), out, r, t, l_,
                n_prefix + g, n_prefix, h * w * c, w * c, c, gw, cpp, n_cells, k,
                PATCH=p, BLOCK_M=block_m, BLOCK_C=block_c,
            )  # fmt: skip
        return out
    pix = gather_patches(canvases, cells, p, channel_last=False)  # [B, L, Cpp] uint8
    rows = torch.zeros(b, t, n_prefix + g, k, dtype=dtype, device=canvases.device)
    tokens = rows[:, :, n_prefix:]  # [B, T, G, K]
    tokens[..., :cpp] = torch.addcmul(col_shift, pix, col_scale).to(dtype).view(b, t, g, cpp)
    tokens.scatter_(-1, (cpp + cells).view(b, t, g, 1), 1.0)
    tokens[..., cpp + n_cells + n_prefix] = 1.0
    for s in range(n_prefix):
        rows[:, :, s, cpp + n_cells + s] = 1.0
    return rows.view(-1, k)


def gather_patches(canvases: torch.Tensor, cells: torch.Tensor, patch: int, channel_last: bool) -> torch.Tensor:
    """The pixels of the given cells of each canvas, by PyTorch's ops (the kernels' fallbacks read them so).

    Args:
        canvases: [B, H, W, C] uint8. cells: [B, L] int64 grid cells (row * W/patch + col).
        channel_last: each patch's columns as (py, px, ch), the decoder's targets; else (ch, py, px), the patch
            projection's.

    Returns:
        [B, L, C*patch*patch] uint8.
    """
    b, h, w, c = canvases.shape
    x = canvases.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.permute(0, 1, 3, 2, 4, 5) if channel_last else x.permute(0, 1, 3, 5, 2, 4)
    patches = x.reshape(b, (h // patch) * (w // patch), c * patch * patch)
    return patches.gather(1, cells[..., None].expand(-1, -1, patches.shape[-1]))


def _glimpse_rows_trial(x: torch.Tensor) -> torch.Tensor:
    # A 4x4 one-channel canvas of 2x2 patches, two glimpses of one cell each and one prefix row.
    canvas = torch.arange(16, device=x.device, dtype=torch.uint8).view(1, 4, 4, 1)
    cells = torch.tensor([[3, 0]], device=x.device)
    ones = torch.ones(4, device=x.device)
    rows = _glimpse_rows(True, canvas, cells, 2, 1, 2, ones, ones, x.dtype)
    return x + rows.float().sum()


def glimpse_weight(
    proj: torch.Tensor, bias: torch.Tensor, table: torch.Tensor, prefix: torch.Tensor, width: int
) -> torch.Tensor:
    """``[W | table^T | prefix^T | b | 0...]``, the weight of :func:`glimpse_rows`' product, with autograd.

    Args:
        proj: [D, Cpp] the patch projection (channel-major columns). bias: [D]. table: [N, D] each cell's position
            row. prefix: [P, D] the prefix tokens as the iterator reads them (their position rows added).
        width: K, the rows' columns (:func:`glimpse_width`).

    Returns:
        [D, K] in proj's dtype.
    """
    d = proj.shape[0]
    parts = [proj, table.t(), prefix.t(), bias.view(d, 1)]
    used = sum(x.shape[1] for x in parts)
    if width < used or any(x.shape[0] != d for x in parts):
        raise ValueError(
            f"glimpse_weight: width={width} must be at least Cpp + N + P + 1 = {used}, and every part D={d} rows"
        )
    return torch.cat([*parts, proj.new_zeros(d, width - used)], dim=1)  # the padding in the same copy
