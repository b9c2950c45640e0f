"""TORE (Token Recycling) over any timm VisionTransformer, with AME's attention-entropy decoder.

A ViT of ``depth`` blocks is split at ``K`` (0 <= K <= depth, chosen per call; one set of weights serves
every K):

* **iterator** ``blocks[:K]`` runs once per glimpse on ``[prefix, glimpse tokens]`` alone; its output
  patch tokens are cached ("midway tokens") and its prefix outputs (CLS and registers) are averaged
  over glimpses;
* **aggregator** ``blocks[K:] -> norm -> head`` runs after every glimpse over
  ``[mean prefix, all cached tokens]`` and gives the logits.

K=0 is full recomputation over all revealed tokens; with every patch revealed it equals the plain
timm forward. K=depth leaves only the final norm and head to the aggregator.

Shapes use: B batch, T glimpses, g glimpse side in patches, G = g*g tokens per glimpse, s = g*patch
sensor side in pixels, P prefix tokens (CLS + registers), D embedding width, L cached tokens, N grid
patches, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from avex.attention import run_blocks
from avex.entropy_attention import entropy_attention
from avex.geometry import GlimpseGeometry
from avex.posembed import POS_ORDERS, grid_sincos, lookup_pos_embed

__all__ = ["AggregatorOutput", "GlimpseDecoder", "TOREViT", "TokenCache", "create_tore"]

_POOLS = ("token", "avg")


@dataclass
class AggregatorOutput:
    """What the aggregator returns after a glimpse.

    Attributes:
        logits: [B, num_classes].
        features: [B, D] pooled pre-logits embedding (the CLS token after the final norm).
        hidden: [B, P + L, D] every token before the final norm.
        valid: [B, P + L] bool, False at cache slots a row has not filled yet; None when all rows are full.
        coords: [B, L, 2] patch coordinates of the cached tokens.
        tokens: [B, P + L, D] every token after the final norm (the decoder's input): computed on first
            access, since the logits need only the CLS token's norm and most callers (a benchmark, an env
            without the entropy map) never read the rest.
    """

    logits: torch.Tensor
    features: torch.Tensor
    hidden: torch.Tensor
    valid: torch.Tensor | None
    coords: torch.Tensor
    norm: nn.Module = field(repr=False)  # the ViT's final norm, for ``tokens``
    _tokens: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens(self) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = self.norm(self.hidden)
        return self._tokens


@dataclass
class TokenCache:
    """Per-row episode state, preallocated for the glimpse budget.

    Attributes:
        buf: [B, P + capacity * G, D]. ``buf[:, :P]`` holds the running mean of the glimpses' prefix
            outputs (the empty pass's prefix while a row has no glimpse); then each glimpse's G midway
            tokens in order. The aggregator reads a view of it: no per-step concatenation.
        coords: float32 [B, capacity * G, 2] patch coordinates of the cached tokens (for the decoder).
        counts: int64 [B] glimpses cached per row, kept on the host so that slicing needs no sync.
        K: the split this cache was filled with (cached tokens are only valid for that K).
        tokens_per_glimpse: G.
    """

    buf: torch.Tensor
    coords: torch.Tensor
    counts: np.ndarray
    K: int
    tokens_per_glimpse: int
    num_prefix: int = field(default=1)

    @property
    def capacity(self) -> int:
        """Glimpses each row can hold."""
        return (self.buf.shape[1] - self.num_prefix) // self.tokens_per_glimpse

    @property
    def batch_size(self) -> int:
        """B: the rows of the cache."""
        return self.buf.shape[0]


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
        qkv = self.qkv(self.norm1(x))  # [B, S, 3 * dim], last axis (3, heads, dim / heads)
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
        x = x + self.mlp(self.norm2(x))
        return x, ent


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
        b, n_obs = coords.shape[:2]
        gh, gw = self.grid
        rc = coords.round().long()
        cell = rc[..., 0].clamp(0, gh - 1) * gw + rc[..., 1].clamp(0, gw - 1)  # [B, L]
        order = torch.arange(n_obs, device=coords.device).expand(b, n_obs)
        if valid is not None:
            order = torch.where(valid, order, -1)
        # amax over token order: deterministic where one cell gets several tokens (a plain scatter is not).
        return torch.full((b, gh * gw), -1, dtype=torch.long, device=coords.device).scatter_reduce(
            1, cell, order, "amax"
        )

    def forward(
        self,
        cls: torch.Tensor,
        tokens: torch.Tensor,
        coords: torch.Tensor,
        valid: torch.Tensor | None = None,
        recon: bool = True,
        entropy: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reconstruct and score the grid.

        Args:
            cls: [B, D] the aggregator's CLS output.
            tokens: [B, L, D] the aggregator's output patch tokens.
            coords: [B, L, 2] their patch coordinates.
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
        b, n_obs = tokens.shape[:2]
        n = self.grid_pos.shape[1]
        head = self.embed(cls)[:, None]  # [B, 1, dim]
        mask = self.mask_token.to(head.dtype)
        if n_obs:
            held = self.cells(coords, valid)  # [B, N]
            picked = self.embed(tokens).gather(1, held.clamp(min=0)[..., None].expand(b, n, self.dim))
            grid = torch.where((held >= 0)[..., None], picked, mask)
        else:  # the empty pass: nothing seen yet
            grid = mask.expand(b, n, -1)
        x = torch.cat([head, grid + self.grid_pos.to(head.dtype)], dim=1)  # [B, 1 + N, dim]
        for blk in self.blocks[:-1]:
            x, _ = blk(x, entropy=False)
        # Only the grid's rows of the last block are read (reconstruction, entropy): query just those.
        x, ent = self.blocks[-1](x, first_query=1, output=recon, entropy=entropy)
        pixels = self.pred(self.norm(x)) if recon else None
        return pixels, None if ent is None else ent.view(b, *self.grid)


class _PixelAffine(NamedTuple):
    """The normalisation constants of :meth:`TOREViT.normalize` when every channel shares them."""

    scale_u8: float  # 1 / (255 std): uint8 pixels
    scale_f: float  # 1 / std: float pixels in [0, 1]
    shift: torch.Tensor  # -mean / std as a 0-dim CPU tensor (a CUDA kernel takes at most one)


class TOREViT(nn.Module):
    """A timm VisionTransformer split into iterator and aggregator, plus a glimpse decoder.

    Args:
        vit: a timm ``VisionTransformer`` with a class token (registers and ``no_embed_class`` are fine),
            learned or fixed absolute position embeddings and ``global_pool`` in {"token", "avg"}; any
            other module raises ValueError.
        mean, std: per-channel pixel normalisation; default from ``vit.pretrained_cfg``.
        decoder_dim, decoder_heads, decoder_depth: the glimpse decoder (``decoder_dim=0``: none).
        decoder_pos: the axis order of the decoder's sin-cos positions: ``"mae"`` (MAE's, AME's and TORE's: weights
            trained by those projects fit) or ``"row_col"`` (avex's decoders trained before the order was recorded).
    """

    # Buffers, registered in __init__ (float32, [1, C, 1, 1] and [C, 1, 1]).
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    _pixel_scale_u8: torch.Tensor
    _pixel_scale_f: torch.Tensor
    _pixel_shift: torch.Tensor

    def __init__(
        self,
        vit: nn.Module,
        *,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        decoder_dim: int = 128,
        decoder_heads: int = 4,
        decoder_depth: int = 1,
        decoder_pos: str = "mae",
    ) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"TORE wraps a timm VisionTransformer, got {type(vit).__name__}")
        if decoder_pos not in POS_ORDERS:
            raise ValueError(f"decoder_pos must be one of {POS_ORDERS}, got {decoder_pos!r}")
        if vit.cls_token is None:
            raise ValueError("TORE needs a ViT with a class token (class_token=True); this one has none")
        if vit.pos_embed is None:
            raise ValueError("TORE needs absolute position embeddings (pos_embed); this ViT has none")
        if vit.global_pool not in _POOLS or getattr(vit, "attn_pool", None) is not None:
            raise ValueError(f"global_pool must be one of {_POOLS}, got {vit.global_pool!r}")
        self.vit: VisionTransformer = vit
        self.depth = len(vit.blocks)
        self.embed_dim = vit.embed_dim
        self.num_prefix = vit.num_prefix_tokens
        self.patch = int(vit.patch_embed.patch_size[0])
        gh, gw = vit.patch_embed.grid_size
        self.grid: tuple[int, int] = (int(gh), int(gw))
        self.img_size = (self.grid[0] * self.patch, self.grid[1] * self.patch)
        self.in_chans = int(vit.patch_embed.proj.in_channels)
        proj = vit.patch_embed.proj
        self._patch_as_linear = (
            isinstance(proj, nn.Conv2d)
            and tuple(proj.kernel_size) == tuple(proj.stride) == (self.patch,) * 2
            and tuple(proj.padding) == (0, 0)
            and tuple(proj.dilation) == (1, 1)
            and proj.groups == 1
        )
        self.num_classes = int(vit.num_classes)
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        mean = _per_channel(mean or cfg.get("mean") or (0.5,), self.in_chans)
        std = _per_channel(std or cfg.get("std") or (0.5,), self.in_chans)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        # normalize() as one multiply-add per channel, [C, 1, 1]: uint8 pixels x -> x * scale + shift (float
        # input: x / std + shift), so a glimpse is normalised, cast and unfolded by one kernel (embed_glimpses).
        std_t, mean_t = torch.tensor(std).view(-1, 1, 1), torch.tensor(mean).view(-1, 1, 1)
        self.register_buffer("_pixel_scale_u8", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("_pixel_scale_f", 1.0 / std_t, persistent=False)
        self.register_buffer("_pixel_shift", -mean_t / std_t, persistent=False)
        # The same constants as kernel arguments when every channel shares them (the scales as numbers, the
        # shift as a 0-dim CPU tensor: a CUDA kernel takes at most one), so only the pixels need strided
        # indexing.
        uniform = len(set(mean)) == 1 and len(set(std)) == 1
        self._pixel_affine_scalars = (
            _PixelAffine(1.0 / (255.0 * std[0]), 1.0 / std[0], torch.tensor(-mean[0] / std[0])) if uniform else None
        )
        self.decoder = (
            GlimpseDecoder(
                self.embed_dim,
                self.grid,
                self.patch,
                self.in_chans,
                decoder_dim,
                decoder_heads,
                decoder_depth,
                pos_order=decoder_pos,
            )
            if decoder_dim
            else None
        )
        # How to rebuild this model (set by create_tore); checkpoints record it.
        self.build_args: dict[str, Any] | None = None

    @property
    def report_ks(self) -> list[int]:
        """The split points every report shows: 0 (full recomputation), depth // 2 and depth."""
        return sorted({0, self.depth // 2, self.depth})

    # Parameters that __init__ checked are present: timm types them Optional.
    @property
    def _pos_embed(self) -> torch.Tensor:
        """``vit.pos_embed``: [1, N (+ P unless no_embed_class), D]."""
        pos_embed = self.vit.pos_embed
        assert pos_embed is not None, "checked in __init__"
        return pos_embed

    @property
    def _cls_token(self) -> torch.Tensor:
        """``vit.cls_token``: [1, 1, D]."""
        cls_token = self.vit.cls_token
        assert cls_token is not None, "checked in __init__"
        return cls_token

    # ------------------------------------------------------------------ checks
    def check_k(self, K: int) -> int:
        """Validate a split point. Raises ValueError naming the allowed range."""
        if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 0 <= K <= self.depth:
            raise ValueError(f"K must be an integer in 0..{self.depth} (the ViT has {self.depth} blocks), got {K!r}")
        return int(K)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError unless images is [B, C, H, W] with this model's channels and size."""
        want = (self.in_chans, *self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images must have shape [B, {want[0]}, {want[1]}, {want[2]}] (B, C, H, W), got {tuple(images.shape)}"
            )

    def _check_glimpses(self, pixels: torch.Tensor, coords: torch.Tensor) -> None:
        if (
            pixels.ndim != 4
            or pixels.shape[1] != self.in_chans
            or pixels.shape[2] != pixels.shape[3]
            or pixels.shape[2] % self.patch
        ):
            raise ValueError(
                f"glimpse pixels must have shape [B, {self.in_chans}, s, s] with s a multiple of the patch size "
                f"{self.patch}, got {tuple(pixels.shape)}"
            )
        if pixels.dtype != torch.uint8 and not pixels.is_floating_point():  # normalize() reads uint8 as 0..255
            raise ValueError(f"glimpse pixels must be uint8 in [0, 255] or float in [0, 1], got {pixels.dtype}")
        g = pixels.shape[2] // self.patch
        if coords.shape != (pixels.shape[0], g * g, 2):
            raise ValueError(f"glimpse coords must have shape [B, {g * g}, 2], got {tuple(coords.shape)}")
        if coords.device.type == "cpu":  # a device check would sync; the geometry layer validates actions
            gh, gw = self.grid
            lo, hi = coords.amin(dim=(0, 1)), coords.amax(dim=(0, 1))
            if lo.min() < 0 or hi[0] > gh - 1 or hi[1] > gw - 1:
                raise ValueError(
                    f"glimpse lies outside the {gh}x{gw} patch grid: token coordinates span rows "
                    f"{lo[0].item()}..{hi[0].item()}, cols {lo[1].item()}..{hi[1].item()}; "
                    f"allowed 0..{gh - 1}, 0..{gw - 1}"
                )

    # ---------------------------------------------------------------- embedding
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] or float in [0, 1] -> normalised float, same shape [B, C, ...]."""
        x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        return (x - self.pixel_mean) / self.pixel_std

    def _patch_pos_table(self) -> torch.Tensor:
        """[N, D] the position embedding of every grid patch."""
        pe = self._pos_embed[0]
        return pe if self.vit.no_embed_class else pe[self.num_prefix :]

    def _prefix(self, batch: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, P, D] the prefix tokens (CLS, registers) with their position embedding where the ViT has one
        (written into ``out`` when given, in one kernel)."""
        vit = self.vit
        cls = self._cls_token
        prefix = cls if vit.reg_token is None else torch.cat([cls, vit.reg_token], dim=1)
        pos = None if vit.no_embed_class else self._pos_embed[:, : self.num_prefix]
        if out is None:
            return (prefix if pos is None else prefix + pos).expand(batch, -1, -1)
        if pos is None:
            return out.copy_(prefix.expand(batch, -1, -1))
        return torch.add(prefix.expand(batch, -1, -1), pos.expand(batch, -1, -1), out=out)

    def embed_glimpses(self, pixels: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Patch-embed glimpses, each token with the position embedding of its place on the full grid.

        Args:
            pixels: [B, C, s, s] uint8 or float in [0, 1].
            coords: [B, G, 2] patch coordinates (int64: aligned; float: interpolated).

        Returns:
            [B, P + G, D] ``[prefix, glimpse tokens]`` ready for the iterator.
        """
        self._check_glimpses(pixels, coords)
        pe = self.vit.patch_embed
        dtype = pe.proj.weight.dtype
        if self._patch_as_linear:
            # The stride-p, p x p convolution as one matrix product over unfolded patches: the same arithmetic,
            # but on a glimpse's few patches cuDNN's convolution pays a large fixed cost per call, far more than
            # a GEMM of this size. Normalising, casting and unfolding are one multiply-add written straight into
            # the unfolded layout, one kernel where separate passes would each add their own fixed cost.
            b, c, h, w = pixels.shape
            p, gh, gw = self.patch, h // self.patch, w // self.patch
            unfolded = pixels.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p] view
            x = torch.empty(unfolded.shape, dtype=dtype, device=pixels.device)
            if self._pixel_affine_scalars is not None:
                sc = self._pixel_affine_scalars
                torch.add(sc.shift, unfolded, alpha=sc.scale_u8 if pixels.dtype == torch.uint8 else sc.scale_f, out=x)
            else:
                scale = self._pixel_scale_u8 if pixels.dtype == torch.uint8 else self._pixel_scale_f
                torch.addcmul(self._pixel_shift, unfolded, scale, out=x)
            x = F.linear(
                x.view(b, gh * gw, c * p * p), pe.proj.weight.reshape(self.embed_dim, -1), pe.proj.bias
            )  # [B, G, D]
        else:
            x = pe.proj(self.normalize(pixels).to(dtype)).flatten(2).transpose(1, 2)  # [B, G, D]
        x = pe.norm(x)  # row-major like coords
        pos = lookup_pos_embed(self._patch_pos_table(), self.grid, coords)
        b, g, d = x.shape
        if torch.is_grad_enabled():  # training: autograd needs the out-of-place form
            x = torch.cat([self._prefix(b).to(x.dtype), x + pos.to(x.dtype)], dim=1)
        else:  # inference: write prefix and tokens into one buffer (no concatenation pass)
            out = torch.empty(b, self.num_prefix + g, d, dtype=x.dtype, device=x.device)
            self._prefix(b, out=out[:, : self.num_prefix])
            torch.add(x, pos.to(x.dtype), out=out[:, self.num_prefix :])
            x = out
        return self.vit.norm_pre(self.vit.pos_drop(x))

    # --------------------------------------------------------- iterator / aggregator
    def iterate(self, x: torch.Tensor, K: int) -> torch.Tensor:
        """blocks[:K] on [B, P + G, D] (each row one glimpse, alone); returns [B, P + G, D]."""
        return run_blocks(self._blocks(0, K), x)

    def _blocks(self, start: int, stop: int | None = None) -> nn.Sequential:
        """``vit.blocks[start:stop]``: a slice of a Sequential is a Sequential (torch's stub says Module)."""
        return cast(nn.Sequential, self.vit.blocks[start:stop])

    def empty_prefix(self, K: int) -> torch.Tensor:
        """[1, P, D]: the iterator's prefix output with no glimpse (AME's 'empty' pass starts here)."""
        x = self.vit.norm_pre(self.vit.pos_drop(self._prefix(1)))
        return self.iterate(x, K)

    def aggregate(
        self, seq: torch.Tensor, K: int, coords: torch.Tensor, valid: torch.Tensor | None = None
    ) -> AggregatorOutput:
        """blocks[K:] -> norm -> pool -> head.

        Args:
            seq: [B, P + L, D] ``[mean prefix, cached tokens]``.
            coords: [B, L, 2] patch coordinates of the cached tokens (float).
            valid: [B, P + L] bool key mask (padding of rows with fewer glimpses); None: all valid.

        Returns:
            The logits, pooled features and tokens. The final norm is a per-token LayerNorm: with CLS pooling
            only the CLS token's is computed here, the rest when ``tokens`` is first read.
        """
        vit = self.vit
        hidden = run_blocks(self._blocks(K), seq, valid)
        tokens = None
        if vit.global_pool == "token":
            pooled = vit.norm(hidden[:, 0])
        else:  # masked mean over patch tokens
            tokens = vit.norm(hidden)
            patches = tokens[:, self.num_prefix :]
            if valid is None:
                pooled = patches.mean(dim=1)
            else:
                w = valid[:, self.num_prefix :, None].to(tokens.dtype)
                pooled = (patches * w).sum(1) / w.sum(1).clamp(min=1)
        features = vit.fc_norm(pooled)
        return AggregatorOutput(vit.head(vit.head_drop(features)), features, hidden, valid, coords, vit.norm, tokens)

    def forward_glimpses(self, pixels: torch.Tensor, coords: torch.Tensor, K: int) -> AggregatorOutput:
        """Single-shot path (training): T glimpses through the iterator at once, then the aggregator.

        Args:
            pixels: [B, T, C, s, s].
            coords: [B, T, G, 2].

        Returns:
            The aggregator's output after all T glimpses; equals T sequential :meth:`step` calls.
        """
        K = self.check_k(K)
        if pixels.ndim != 5 or coords.ndim != 4 or pixels.shape[:2] != coords.shape[:2]:
            raise ValueError(
                "expected pixels [B, T, C, s, s] and coords [B, T, G, 2], "
                f"got {tuple(pixels.shape)} and {tuple(coords.shape)}"
            )
        b, t = pixels.shape[:2]
        x = self.iterate(self.embed_glimpses(pixels.flatten(0, 1), coords.flatten(0, 1)), K)
        x = x.view(b, t, *x.shape[1:])
        prefix = x[:, :, : self.num_prefix].mean(dim=1)
        tokens = x[:, :, self.num_prefix :].reshape(b, -1, x.shape[-1])
        return self.aggregate(torch.cat([prefix, tokens], dim=1), K, coords.reshape(b, -1, 2).float())

    def forward(self, pixels: torch.Tensor, coords: torch.Tensor, K: int) -> torch.Tensor:
        """Logits [B, classes] of the single-shot path (see :meth:`forward_glimpses`)."""
        return self.forward_glimpses(pixels, coords, K).logits

    # ------------------------------------------------------------ sequential, cached
    def init_cache(
        self,
        batch: int,
        capacity: int,
        K: int,
        tokens_per_glimpse: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TokenCache:
        """Allocate an empty cache for ``batch`` rows of at most ``capacity`` glimpses of G tokens each.

        Args:
            batch, capacity, K, tokens_per_glimpse: B, glimpses per row, the split point and G.
            device, dtype: of the token buffer; default the model's (its position embedding's).

        Returns:
            A :class:`TokenCache` with ``buf`` [B, P + capacity * G, D] and ``coords`` [B, capacity * G, 2],
            every row reset to the empty pass.
        """
        K = self.check_k(K)
        ref = self._pos_embed
        buf = torch.zeros(
            batch,
            self.num_prefix + capacity * tokens_per_glimpse,
            self.embed_dim,
            device=device or ref.device,
            dtype=dtype or ref.dtype,
        )
        coords = torch.zeros(batch, capacity * tokens_per_glimpse, 2, device=buf.device)
        cache = TokenCache(buf, coords, np.zeros(batch, dtype=np.int64), K, tokens_per_glimpse, self.num_prefix)
        self.reset_cache(cache)
        return cache

    @torch.no_grad()
    def reset_cache(self, cache: TokenCache, rows: np.ndarray | None = None) -> None:
        """Empty some rows (bool mask or indices [B]; None = all). Other rows are untouched."""
        idx = (
            np.arange(cache.batch_size)
            if rows is None
            else np.flatnonzero(np.asarray(rows))
            if np.asarray(rows).dtype == bool
            else np.asarray(rows)
        )
        if idx.size == 0:
            return
        cache.counts[idx] = 0
        prefix = self.empty_prefix(cache.K).to(cache.buf.dtype)
        if (
            idx.size == cache.batch_size and (idx == np.arange(idx.size)).all()
        ):  # all rows: a slice, no index copy (no sync; capturable)
            cache.buf[:, : self.num_prefix] = prefix
        else:
            t = torch.as_tensor(idx, device=cache.buf.device)
            cache.buf[t, : self.num_prefix] = prefix

    def step(self, cache: TokenCache, pixels: torch.Tensor, coords: torch.Tensor) -> AggregatorOutput:
        """One glimpse for every row: iterator pass, cache update, aggregator over everything cached.

        Args:
            cache: from :meth:`init_cache`; updated in place.
            pixels: [B, C, s, s] this step's glimpses.
            coords: [B, G, 2] their token coordinates.

        Returns:
            The aggregator's output over every row's cached tokens (see :meth:`aggregate_cache`).
        """
        g2, p = cache.tokens_per_glimpse, self.num_prefix
        if coords.shape[1] != g2 or pixels.shape[0] != cache.batch_size:
            raise ValueError(
                f"this cache holds {cache.batch_size} rows of {g2}-token glimpses, "
                f"got pixels {tuple(pixels.shape)}, coords {tuple(coords.shape)}"
            )
        n = cache.counts
        if (n >= cache.capacity).any():
            raise ValueError(
                f"the token cache is full ({cache.capacity} glimpses per row): reset the rows before more glimpses"
            )
        x = self.iterate(self.embed_glimpses(pixels, coords), cache.K).to(cache.buf.dtype)
        if (n == n[0]).all():  # rows in step: static slices (CUDA-graph friendly)
            n0 = int(n[0])
            cache.buf[:, p + n0 * g2 : p + (n0 + 1) * g2] = x[:, p:]
            cache.coords[:, n0 * g2 : (n0 + 1) * g2] = coords  # copy_ casts to float
            cache.buf[:, :p].lerp_(x[:, :p], 1.0 / (n0 + 1))  # running mean: one kernel, one rounding
        else:  # rows reset at different times: scatter at per-row offsets
            dev = cache.buf.device
            b = torch.arange(cache.batch_size, device=dev)[:, None]
            slots = torch.as_tensor(n[:, None] * g2 + np.arange(g2)[None], device=dev)
            cache.buf[b, p + slots] = x[:, p:]
            cache.coords[b, slots] = coords.float()
            weight = torch.as_tensor(1.0 / (n + 1), device=dev, dtype=cache.buf.dtype)[:, None, None]
            cache.buf[:, :p].lerp_(x[:, :p], weight)
        cache.counts += 1
        return self.aggregate_cache(cache)

    def aggregate_cache(self, cache: TokenCache) -> AggregatorOutput:
        """The aggregator over each row's cached tokens (rows with no glimpse give the empty pass).

        Returns:
            :meth:`aggregate` over ``[B, P + L, D]``, L = G times the most glimpses any row holds (rows with
            fewer are masked by ``valid``).
        """
        g2, p = cache.tokens_per_glimpse, self.num_prefix
        n = cache.counts
        length = int(n.max()) * g2
        valid = None
        if not (n == n[0]).all():
            lengths = torch.as_tensor(p + n * g2, device=cache.buf.device)
            valid = torch.arange(p + length, device=cache.buf.device)[None] < lengths[:, None]
        return self.aggregate(cache.buf[:, : p + length], cache.K, cache.coords[:, :length], valid)

    # ------------------------------------------------------------------ decoder
    def decode(
        self, out: AggregatorOutput, recon: bool = True, entropy: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run the glimpse decoder on an aggregator output.

        Args:
            recon, entropy: which outputs to compute; skipping one saves its work (see :class:`GlimpseDecoder`).

        Returns:
            recon [B, N, patch * patch * C] (normalised pixels) and entropy float32 [B, gh, gw] (None where not asked).
        """
        if self.decoder is None:
            raise ValueError("this model was built without a decoder (decoder_dim=0)")
        valid = None if out.valid is None else out.valid[:, self.num_prefix :]
        return self.decoder(
            out.tokens[:, 0], out.tokens[:, self.num_prefix :], out.coords, valid, recon=recon, entropy=entropy
        )

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, C, H, W] -> per-patch pixels [B, N, patch * patch * C] (decoder target layout)."""
        b, c, h, w = images.shape
        p = self.patch
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    # ------------------------------------------------------------------ helpers
    def geometry(self, glimpse: int, stride: int = 1) -> GlimpseGeometry:
        """The glimpse geometry of this model's image size and patch."""
        return GlimpseGeometry(self.img_size, self.patch, glimpse, stride)

    def tile(self, images: torch.Tensor, glimpse: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every patch revealed: non-overlapping g x g glimpses tiling the image, row-major.

        Args:
            images: [B, C, H, W] uint8 or float in [0, 1].

        Returns:
            pixels [B, T, C, s, s] and int64 coords [B, T, G, 2], T = N / G.
        """
        self.check_images(images)
        geo = self.geometry(glimpse, stride=glimpse)
        if geo.grid[0] % glimpse or geo.grid[1] % glimpse:
            raise ValueError(f"a {glimpse}x{glimpse} glimpse does not tile the {geo.grid} grid")
        b, t = images.shape[0], geo.num_actions
        rows, cols = (torch.as_tensor(v, device=images.device) for v in geo.action_to_patch(np.arange(t)))
        canv = images.permute(0, 2, 3, 1).repeat_interleave(t, dim=0)
        pix = geo.cut(canv, rows.repeat(b), cols.repeat(b)).view(
            b, t, self.in_chans, geo.sensor_pixels, geo.sensor_pixels
        )
        coords = geo.glimpse_coords(rows, cols)[None].expand(b, -1, -1, -1)
        return pix, coords


def _per_channel(values: tuple[float, ...] | list[float], channels: int) -> tuple[float, ...]:
    """Fit a normalisation constant to the channel count (a 3-channel default on a 1-channel model: their mean)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    return (sum(values) / len(values),) * channels


def create_tore(
    model: str | VisionTransformer = "vit_tiny_patch16_224",
    *,
    img_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    decoder_dim: int = 128,
    decoder_heads: int = 4,
    decoder_depth: int = 1,
    decoder_pos: str = "mae",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **timm_kwargs: Any,
) -> TOREViT:
    """Build a :class:`TOREViT` from a timm model name (or wrap an instance).

    Args:
        model: timm name such as ``"vit_tiny_patch16_224"`` or ``"deit3_small_patch16_224"``, or a
            ``VisionTransformer`` instance.
        img_size, patch_size, in_chans, num_classes: timm overrides.
        pretrained: load timm's pretrained weights (from the hub cache; needs network the first time).
        weights: a local timm-format weights file (.safetensors/.pth) to load instead of the hub.
        decoder_dim, decoder_heads, decoder_depth, decoder_pos: the glimpse decoder (see :class:`TOREViT`); new
            models take MAE's position order, and the checkpoint records it (``load_tore`` reads a config
            without it as ``"row_col"``, the order every earlier avex decoder was trained with).
        timm_kwargs: more ``timm.create_model`` arguments (embed_dim, depth, num_heads, reg_tokens, ...).
    """

    def wrap(vit: nn.Module) -> TOREViT:
        return TOREViT(
            vit,
            mean=mean,
            std=std,
            decoder_dim=decoder_dim,
            decoder_heads=decoder_heads,
            decoder_depth=decoder_depth,
            decoder_pos=decoder_pos,
        )

    if isinstance(model, nn.Module):
        return wrap(model)
    kwargs: dict[str, Any] = {
        k: v
        for k, v in dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes).items()
        if v is not None
    }
    kwargs.update(timm_kwargs)
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    try:
        if weights is not None:
            vit = timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
        else:
            vit = timm.create_model(model, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm model {model!r}: see timm.list_models('vit*')") from err
        raise
    tore = wrap(vit)
    tore.build_args = dict(
        model=model,
        **kwargs,
        decoder_dim=decoder_dim,
        decoder_heads=decoder_heads,
        decoder_depth=decoder_depth,
        decoder_pos=decoder_pos,
        mean=list(tore.pixel_mean.flatten().tolist()),
        std=list(tore.pixel_std.flatten().tolist()),
    )
    return tore
