"""Where each token of the glimpse decoder's sequence comes from: every observed token's grid cell, and every
token's row in the decoder's table of distinct rows.

The decoder's input for row b is ``[CLS, cell 0, ..., cell N-1]``: a cell holds its latest observed token (a
token's cell is its coordinates rounded, half to even as :func:`torch.round`, and clamped to the grid) or, where
nothing was seen, the mask token. As rows of one table (``GlimpseDecoder._table``): the B CLS rows first, then
the B * L observed tokens (row b's token l at ``B + b * L + l``), then the N mask rows (cell c at
``B + B * L + c``).

Two functions, same results: :func:`reference_sequence_index` (PyTorch, any device: some twenty small ops) and
:func:`sequence_index_kernel` (Triton: one launch, one program per row). At the few hundred rows of a TORE
benchmark's batch those small ops, not the data, are what the decoder's time is made of.
:func:`sequence_index` picks the kernel where it can run.

Shapes: B rows, L observed tokens per row, N = gh * gw grid cells.
"""

from __future__ import annotations

import torch

from avex.kernel_fallback import _kernel_may_run, kernel_or_fallback, triton

if triton is not None:
    import triton.language as tl

__all__ = ["held_tokens", "reference_sequence_index", "sequence_index", "sequence_index_kernel", "token_cells"]


# ----------------------------------------------------------------------------------------- the kernel
if triton is not None:

    @triton.jit
    def _round_half_even(v):
        # torch.round: floor(v + 0.5), then one down where that took a tie to an odd number.
        v = v.to(tl.float32)
        r = tl.floor(v + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(((r - v) == 0.5) & odd, r - 1.0, r).to(tl.int64)

    @triton.jit
    def _sequence_index_kernel(
        coords_ptr,
        valid_ptr,
        cell_ptr,
        index_ptr,
        batch,
        n_obs,
        stride_coords_b,
        stride_coords_l,
        stride_valid_b,
        GH: tl.constexpr,
        GW: tl.constexpr,
        N_BLOCKS: tl.constexpr,
        HAS_VALID: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # One program = one row b: its tokens' cells, then, per block of cells, the latest valid token there.
        b = tl.program_id(0).to(tl.int64)
        n: tl.constexpr = GH * GW
        toks = tl.arange(0, BLOCK_L)
        in_l = toks < n_obs
        at = coords_ptr + b * stride_coords_b + toks * stride_coords_l
        row = tl.minimum(tl.maximum(_round_half_even(tl.load(at, mask=in_l, other=0.0)), 0), GH - 1)
        col = tl.minimum(tl.maximum(_round_half_even(tl.load(at + 1, mask=in_l, other=0.0)), 0), GW - 1)
        cell = row * GW + col
        tl.store(cell_ptr + b * n_obs + toks, cell, mask=in_l)
        live = in_l
        if HAS_VALID:
            live = live & (tl.load(valid_ptr + b * stride_valid_b + toks, mask=in_l, other=0) != 0)
        order = tl.where(live, toks, -1)
        tl.store(index_ptr + b * (1 + n), b)  # CLS: the table's row b
        for nb in tl.static_range(N_BLOCKS):
            cells = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            hit = cell[:, None] == cells[None, :]  # [BLOCK_L, BLOCK_N]
            latest = tl.max(tl.where(hit, order[:, None], -1), axis=0)
            seen = batch + b * n_obs + latest
            unseen = batch + batch * n_obs + cells
            tl.store(index_ptr + b * (1 + n) + 1 + cells, tl.where(latest >= 0, seen, unseen), mask=cells < n)


def _check(coords: torch.Tensor, valid: torch.Tensor | None, grid: tuple[int, int]) -> tuple[int, int]:
    """(B, L) of a valid call; ValueError naming what is wrong otherwise."""
    if coords.ndim != 3 or coords.shape[-1] != 2 or not coords.is_floating_point():
        raise ValueError(f"coords must be float [B, L, 2] (row, col), got {coords.dtype} {tuple(coords.shape)}")
    b, n_obs = coords.shape[:2]
    if valid is not None and (valid.shape != (b, n_obs) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be bool [B, L] = [{b}, {n_obs}], got {valid.dtype} {tuple(valid.shape)}")
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be (rows, cols) >= 1, got {grid}")
    return b, n_obs


def sequence_index_kernel(
    coords: torch.Tensor, valid: torch.Tensor | None, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference_sequence_index` by the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("sequence_index_kernel needs Triton (it ships with PyTorch's CUDA wheels)")
    b, n_obs = _check(coords, valid, grid)
    if coords.stride(-1) != 1:
        coords = coords.contiguous()
    n = grid[0] * grid[1]
    cell = torch.empty(b, n_obs, dtype=torch.long, device=coords.device)
    index = torch.empty(b, 1 + n, dtype=torch.long, device=coords.device)
    if b == 0:
        return cell, index
    block_l = max(2, triton.next_power_of_2(n_obs))
    block_n = max(16, min(256, triton.next_power_of_2(n), 8192 // block_l))  # <= 8,192 comparisons at once
    _sequence_index_kernel[(b,)](
        coords,
        valid if valid is not None else coords,  # never read without HAS_VALID
        cell,
        index,
        b,
        n_obs,
        coords.stride(0),
        coords.stride(1),
        valid.stride(0) if valid is not None else 0,
        GH=grid[0],
        GW=grid[1],
        N_BLOCKS=triton.cdiv(n, block_n),
        HAS_VALID=valid is not None,
        BLOCK_L=block_l,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return cell, index


# ------------------------------------------------------------------------------------- the reference
def token_cells(coords: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """int64 [B, L]: the grid cell (row-major) of every token, its coordinates rounded and clamped to the grid."""
    gh, gw = grid
    rc = coords.round().long()
    return rc[..., 0].clamp(0, gh - 1) * gw + rc[..., 1].clamp(0, gw - 1)


def held_tokens(cell: torch.Tensor, valid: torch.Tensor | None, n: int) -> torch.Tensor:
    """int64 [B, N]: which token each of the N cells holds (its latest valid one), -1 where none; from
    :func:`token_cells`' [B, L]."""
    b, n_obs = cell.shape
    order = torch.arange(n_obs, device=cell.device).expand(b, n_obs)
    if valid is not None:
        order = torch.where(valid, order, -1)
    # amax over token order: deterministic where one cell gets several tokens (a plain scatter is not).
    return torch.full((b, n), -1, dtype=torch.long, device=cell.device).scatter_reduce(1, cell, order, "amax")


def reference_sequence_index(
    coords: torch.Tensor, valid: torch.Tensor | None, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every observed token's cell and every sequence token's table row.

    Args:
        coords: float [B, L, 2] the observed tokens' patch coordinates (row, col), fractional ones allowed.
        valid: bool [B, L], False at padding (never held by a cell); None: all valid.
        grid: (gh, gw).

    Returns:
        cell: int64 [B, L], each token's cell (row-major; padding's too);
        index: int64 [B, 1 + N], the table row of CLS and of every cell (see the module's docstring).
    """
    b, n_obs = _check(coords, valid, grid)
    n = grid[0] * grid[1]
    cell = token_cells(coords, grid)
    held = held_tokens(cell, valid, n)
    index = torch.empty(b, 1 + n, dtype=torch.long, device=coords.device)
    index[:, 0] = torch.arange(b, device=coords.device)
    unseen = b + b * n_obs + torch.arange(n, device=coords.device)  # the mask token's row of each cell
    seen = b + torch.arange(b, device=coords.device)[:, None] * n_obs + held  # the row of the cell's token
    index[:, 1:] = torch.where(held >= 0, seen, unseen)
    return cell, index


# -------------------------------------------------------------------------------------------- dispatch
def sequence_index(
    coords: torch.Tensor, valid: torch.Tensor | None, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_index_kernel` where it can run (Triton, CUDA or the interpreter, no autograd), else
    :func:`reference_sequence_index`; if the kernel fails to build or launch here, the reference from then on,
    with one warning. Args and returns as :func:`reference_sequence_index`."""
    _check(coords, valid, grid)
    if not _kernel_may_run(coords):
        return reference_sequence_index(coords, valid, grid)
    return kernel_or_fallback(
        "decoder index",
        lambda: sequence_index_kernel(coords, valid, grid),
        lambda: reference_sequence_index(coords, valid, grid),
        "the decoder's sequence index now uses PyTorch's ops, with the same results but slower.",
    )
