"""Position embeddings: the one place that maps patch-grid coordinates to embedding vectors.

Coordinates are in *patch units* on the full-image grid: the centre of patch (r, c) sits at (r, c).
Integer coordinates (a glimpse aligned to the patch grid) index the table exactly; float coordinates
(a scaled, continuous glimpse) interpolate it bilinearly, which reduces to the exact lookup at integers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["POS_ORDERS", "grid_coords", "grid_sincos", "lookup_pos_embed", "sincos_2d"]

# Which half of a 2-D sin-cos vector encodes which axis (see :func:`grid_sincos`).
POS_ORDERS = ("mae", "row_col")


def grid_coords(grid: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Integer (row, col) of every patch in row-major order. Returns int64 [gh * gw, 2]."""
    gh, gw = grid
    rows = torch.arange(gh, device=device).repeat_interleave(gw)
    cols = torch.arange(gw, device=device).repeat(gh)
    return torch.stack([rows, cols], dim=-1)


def lookup_pos_embed(table: torch.Tensor, grid: tuple[int, int], coords: torch.Tensor) -> torch.Tensor:
    """Position embeddings of tokens at patch-grid coordinates.

    Args:
        table: [gh * gw, D] learned or fixed embedding of every grid cell, row-major.
        grid: (gh, gw).
        coords: [..., 2] (row, col). Integer dtype: exact gather. Float: bilinear interpolation,
            clamped to the grid (a continuous glimpse's token centres stay inside the image).

    Returns:
        [..., D]
    """
    gh, gw = grid
    if not coords.is_floating_point():  # flat index in one kernel, then a row gather (embedding: vectorised rows)
        return F.embedding(torch.add(coords[..., 1], coords[..., 0], alpha=gw), table)
    r = coords[..., 0].clamp(0, gh - 1)
    c = coords[..., 1].clamp(0, gw - 1)
    r0, c0 = r.floor().long(), c.floor().long()
    r1, c1 = (r0 + 1).clamp(max=gh - 1), (c0 + 1).clamp(max=gw - 1)
    wr, wc = (r - r0).unsqueeze(-1).to(table.dtype), (c - c0).unsqueeze(-1).to(table.dtype)
    top = table[r0 * gw + c0] * (1 - wc) + table[r0 * gw + c1] * wc
    bottom = table[r1 * gw + c0] * (1 - wc) + table[r1 * gw + c1] * wc
    return top * (1 - wr) + bottom * wr


def sincos_2d(coords: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding (MAE style) evaluated at any, also fractional, coordinates.

    Args:
        coords: [..., 2] in patch units; the first half of the result encodes ``coords[..., 0]``, the second
            half ``coords[..., 1]`` (pass (col, row) for MAE's order: :func:`grid_sincos`).
        dim: embedding width, divisible by 4 (half per axis, each half sin | cos).

    Returns:
        float32 [..., dim]
    """
    if dim % 4:
        raise ValueError(f"sin-cos embedding width must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=coords.device, dtype=torch.float32) / quarter)
    parts = []
    for axis in range(2):
        angle = coords[..., axis].float().unsqueeze(-1) * omega
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=-1)


def grid_sincos(grid: tuple[int, int], dim: int, order: str = "mae") -> torch.Tensor:
    """The fixed 2-D sin-cos table of every grid cell, row-major, in either axis order.

    Args:
        grid: (gh, gw).
        dim: embedding width, divisible by 4.
        order: ``"mae"``: the first half encodes the column, the second the row, as MAE's
            ``get_2d_sincos_pos_embed`` builds it ("w goes first"; AME and TORE use it too), so decoder
            weights trained by those projects fit; ``"row_col"``: the first half encodes the row (avex's
            decoders before the order was recorded).

    Returns:
        float32 [gh * gw, dim].
    """
    if order not in POS_ORDERS:
        raise ValueError(f"position order must be one of {POS_ORDERS}, got {order!r}")
    coords = grid_coords(grid)
    return sincos_2d(coords.flip(-1) if order == "mae" else coords, dim)
