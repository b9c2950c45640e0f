"""TORE's glimpse decoder: MAE-style reconstruction of every patch and AME's attention-entropy map.

Shapes use: B batch, D the ViT's embedding width, L observed tokens, N grid patches, C channels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from avex.decoder_index import held_tokens, sequence_index, token_cells
from avex.decoder_table import normed_table, table_rows
from avex.entropy_attention import entropy_attention
from avex.kernel_fallback import _kernel_may_run
from avex.layer_norm import norm_forward
from avex.posembed import grid_sincos

__all__ = ["GlimpseDecoder"]


class _DecoderBlock(nn.Module):
    """Pre-norm transformer block whose attention probabilities are returned (AME reads them)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: torch.Tensor, first_query: int = 0, output: bool = True, entropy: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Attend from the rows ``x[:, first_query:]`` to every row.

        Args:
            x: [B, S, dim] (every row a valid key: the decoder's grid has no padding).
            first_query: rows before it are keys only (the last decoder block needs only the grid's rows).
            output: compute the block's output rows (False: None; the entropy needs only q and k).
            entropy: compute the attention entropy (False: None; the output alone then runs as one fused
                ``scaled_dot_product_attention``).

        Returns:
            x [B, S - first_query, dim] or None, and per query row the entropy of its attention over all
            keys but key 0 (CLS), summed over heads, in bits: float32 [B, S - first_query] or None.
        """
        b, s, d = x.shape
        qkv = self.qkv(norm_forward(self.norm1, x))  # [B, S, 3 * dim], last axis (3, heads, dim / heads)
        ent = None
        if entropy:
            # Attention and entropy in one pass that never writes the attention map (a Triton kernel on CUDA;
            # PyTorch, in chunks of query rows, elsewhere).
            attended, ent = entropy_attention(qkv, self.heads, first_query=first_query, skip_keys=1, output=output)
        else:
            q, k, v = qkv.view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q[:, :, first_query:], k, v)
            attended = attended.transpose(1, 2).reshape(b, s - first_query, d)
        if attended is None:
            return None, ent
        x = x[:, first_query:] + self.proj(attended)
        x = x + self.mlp(norm_forward(self.norm2, x))
        return x, ent

    def entropy_from_normed(self, normed: torch.Tensor, index: torch.Tensor, first_query: int = 0) -> torch.Tensor:
        """:meth:`forward`'s entropy alone, for sequences given as a table of distinct rows, already normed by
        ``norm1``, and an index.

        The norm and the qkv projection act on each row alone, so they run once per distinct row (the mask
        token's rows are shared by every sequence) and the kernel reads each sequence through ``index``:
        the [B, S, dim] sequence and its [B, S, 3 * dim] projection are never written.

        Args:
            normed: [R, dim] ``norm1`` of the distinct rows; index: int64 [B, S], token s of sequence b is row
                ``index[b, s]``.

        Returns:
            float32 [B, S - first_query]: the entropy of :meth:`forward`, from the same arithmetic per row.
        """
        qkv = self.qkv(normed)  # [R, 3 * dim]
        _, ent = entropy_attention(qkv, self.heads, first_query=first_query, skip_keys=1, output=False, rows=index)
        assert ent is not None
        return ent


class GlimpseDecoder(nn.Module):
    """TORE's one-block MAE-style decoder: reconstruction of every patch and AME's entropy map.

    As in AME and TORE, the sequence is ``[CLS, grid]``: every grid cell holds the observed token of
    that patch (projected to the decoder's width) or, where nothing was seen, the mask token; every cell
    gets the fixed sin-cos position of its place (``pos_order``: MAE's (col, row) halves, or avex's former
    (row, col); see :func:`avex.posembed.grid_sincos`). Each cell predicts its patch's pixels, and the
    entropy of an unseen cell's attention row (over all keys but CLS, summed over heads, in bits) is AME's
    uncertainty for that patch. A patch seen twice (overlapping glimpses) holds its latest token; a
    token off the grid (continuous glimpses, fractional coordinates) goes to its nearest cell.
    """

    grid_pos: torch.Tensor  # buffer [1, N, dim]: the fixed sin-cos position of every grid cell

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int],
        patch: int,
        in_chans: int,
        dim: int = 128,
        heads: int = 4,
        depth: int = 1,
        mlp_ratio: float = 4.0,
        pos_order: str = "mae",
    ) -> None:
        super().__init__()
        self.grid = grid
        self.dim = dim
        self.pos_order = pos_order
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(_DecoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch * in_chans)
        self.register_buffer("grid_pos", grid_sincos(grid, dim, pos_order)[None], persistent=False)
        nn.init.normal_(self.mask_token, std=0.02)

    def cells(self, coords: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Which observed token each grid cell holds: its latest one, or -1 where none.

        Args:
            coords: [B, L, 2] token patch coordinates (rounded to the nearest cell); valid: [B, L] bool or None.

        Returns:
            int64 [B, N] token index per cell (row-major), -1 for unseen cells.
        """
        return held_tokens(token_cells(coords, self.grid), valid, self.grid_pos.shape[1])

    def _sequence(
        self, cls: torch.Tensor, tokens: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """The decoder's input ``[CLS, grid + position]``: [B, 1 + N, dim].

        Without autograd, one gather from :meth:`_table`'s rows: the same sums as adding the positions to the
        whole grid, bit for bit, written in one pass over the sequence instead of four (a gather, a select, the
        addition, a concatenation). With autograd, those four: their backward needs no atomic sums over rows
        that many cells share (the mask token's).
        """
        b, n = cls.shape[0], self.grid_pos.shape[1]
        if not torch.is_grad_enabled():
            table, index = self._table(cls, tokens, coords, valid)
            return table.index_select(0, index.view(-1)).view(b, 1 + n, self.dim)
        head = self.embed(cls)
        mask = self.mask_token.to(head.dtype)[0]  # [1, dim]
        if not tokens.shape[1]:  # the empty pass: nothing seen yet
            grid = mask.expand(b, n, -1)
        else:
            held = self.cells(coords, valid)
            picked = self.embed(tokens).gather(1, held.clamp(min=0)[..., None].expand(b, n, self.dim))
            grid = torch.where((held >= 0)[..., None], picked, mask)
        return torch.cat([head[:, None], grid + self.grid_pos.to(head.dtype)], dim=1)

    def _table(
        self, cls: torch.Tensor, tokens: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's input as distinct rows and an index (:mod:`avex.decoder_index`): the table
        [B + B * L + N, dim] (the embedded CLS tokens, every observed token plus its cell's position, the mask
        token plus each cell's position) and int64 [B, 1 + N], the table's row of every token of every sequence."""
        head = self.embed(cls)  # [B, dim]
        pos = self.grid_pos[0].to(head.dtype)  # [N, dim]
        cell, index = sequence_index(coords, valid, self.grid)
        return table_rows(head, self.embed(tokens), cell, pos, self.mask_token.to(head.dtype)[0, 0]), index

    def _normed_table(
        self, latent: torch.Tensor, prefix: int, coords: torch.Tensor, valid: torch.Tensor | None, norm1: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm1`` (the first block's) of :meth:`_table`'s rows, and the index: [B + B * L + N, dim] and int64
        [B, 1 + N]. Where a kernel may run (CUDA or Triton's interpreter, no autograd), one product embeds the whole
        sequence, its tokens read in place, and :func:`avex.decoder_table.normed_table` places and norms the rows in
        one pass; elsewhere (the CPU) :meth:`_table`'s ops, then the norm."""
        if not _kernel_may_run(latent):
            table, index = self._table(latent[:, 0], latent[:, prefix:], coords, valid)
            return norm_forward(norm1, table), index
        cell, index = sequence_index(coords, valid, self.grid)
        emb = self.embed(latent)  # [B, P + L, dim]
        pos = self.grid_pos[0].to(emb.dtype)
        return normed_table(emb, prefix, cell, pos, self.mask_token.to(emb.dtype)[0, 0], norm1), index

    def forward(
        self,
        latent: torch.Tensor,
        coords: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        prefix: int = 1,
        recon: bool = True,
        entropy: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reconstruct and score the grid from the encoder's output, as MAE's decoder takes it.

        Args:
            latent: [B, P + L, D] the aggregator's tokens after the final norm: CLS first, the observed tokens from
                ``prefix`` (P) on (registers between are not read).
            coords: [B, L, 2] the observed tokens' patch coordinates.
            valid: [B, L] bool, False at padding; None if all valid.
            recon, entropy: which outputs to compute (the other is None). Entropy alone skips the last
                block's attention output, MLP and pixel head (an env reads only the entropy map);
                reconstruction alone runs fused attention (training reads only the pixels).

        Returns:
            recon: [B, N, patch * patch * C] predicted (normalised) pixels of every patch, or None;
            entropy: float32 [B, gh, gw] attention entropy per patch (AME), before masking seen patches, or None.
        """
        if not (recon or entropy):
            raise ValueError("ask the decoder for recon, entropy or both")
        b = latent.shape[0]
        if not recon and len(self.blocks) == 1 and not torch.is_grad_enabled():
            # The entropy alone of a one-block decoder reads only q and k of each token: computed per distinct
            # row, read through an index (see _DecoderBlock.entropy_from_normed).
            block = self.blocks[0]
            assert isinstance(block, _DecoderBlock)
            normed, index = self._normed_table(latent, prefix, coords, valid, block.norm1)
            ent = block.entropy_from_normed(normed, index, first_query=1)
            return None, ent.view(b, *self.grid)
        x = self._sequence(latent[:, 0], latent[:, prefix:], coords, valid)
        for blk in self.blocks[:-1]:
            x, _ = blk(x, entropy=False)
        # Only the grid's rows of the last block are read (reconstruction, entropy): query just those.
        x, ent = self.blocks[-1](x, first_query=1, output=recon, entropy=entropy)
        pixels = self.pred(norm_forward(self.norm, x)) if recon else None
        return pixels, None if ent is None else ent.view(b, *self.grid)
