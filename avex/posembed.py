"""Position embeddings: the one place that maps patch-grid coordinates to embedding vectors.

Coordinates are in *patch units* on the full-image grid: the centre of patch (r, c) sits at (r, c).
Integer coordinates (a glimpse aligned to the patch grid) index the table exactly; float coordinates
(a scaled, continuous glimpse) interpolate it bilinearly, which reduces to the exact lookup at integers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grid_coords", "lookup_pos_embed", "sincos_2d"]


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
        coords: [..., 2] (row, col) in patch units.
        dim: embedding width, divisible by 4 (half for rows, half for columns, each half sin | cos).

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
