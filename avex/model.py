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

The stages: :meth:`~TOREViT.embed_glimpses` (from :class:`avex.embedding.GlimpseViT`) -> :meth:`~TOREViT.iterate`
-> :class:`avex.cache.TokenCache` -> :meth:`~TOREViT.aggregate` -> :meth:`~TOREViT.decode`
(:class:`avex.decoder.GlimpseDecoder`).

Shapes use: B batch, T glimpses, g glimpse side in patches, G = g*g tokens per glimpse, s = g*patch
sensor side in pixels, P prefix tokens (CLS + registers), D embedding width, L cached tokens, N grid
patches, C channels.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from avex.attention import run_blocks
from avex.cache import AggregatorOutput, TokenCache
from avex.decoder import GlimpseDecoder
from avex.embedding import GlimpseViT
from avex.geometry import GlimpseGeometry
from avex.layer_norm import norm_forward
from avex.posembed import POS_ORDERS

__all__ = ["TOREViT", "create_tore"]

_POOLS = ("token", "avg")


class TOREViT(GlimpseViT):
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
        vit = _checked_vit(vit, decoder_pos)
        super().__init__(vit, mean=mean, std=std)
        self.depth = len(vit.blocks)
        self.num_classes = int(vit.num_classes)
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

    # ------------------------------------------------------------------ checks
    def check_k(self, K: int) -> int:
        """Validate a split point. Raises ValueError naming the allowed range."""
        if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 0 <= K <= self.depth:
            raise ValueError(f"K must be an integer in 0..{self.depth} (the ViT has {self.depth} blocks), got {K!r}")
        return int(K)

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
            The logits, pooled features and tokens. The final norm is a per-token LayerNorm (by
            :func:`~avex.layer_norm.norm_forward`): with CLS pooling only the CLS token's is computed here, the
            rest when ``tokens`` is first read.
        """
        vit = self.vit
        hidden = run_blocks(self._blocks(K), seq, valid)
        tokens = None
        if vit.global_pool == "token":
            pooled = norm_forward(vit.norm, hidden[:, 0])
        else:  # masked mean over patch tokens
            tokens = norm_forward(vit.norm, hidden)
            patches = tokens[:, self.num_prefix :]
            if valid is None:
                pooled = patches.mean(dim=1)
            else:
                w = valid[:, self.num_prefix :, None].to(tokens.dtype)
                pooled = (patches * w).sum(1) / w.sum(1).clamp(min=1)
        features = norm_forward(vit.fc_norm, pooled)
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
        idx = cache.row_indices(rows)
        if idx.size == 0:
            return
        cache.counts[idx] = 0
        cache.write_prefix(idx, self.empty_prefix(cache.K))

    def step(self, cache: TokenCache, pixels: torch.Tensor, coords: torch.Tensor) -> AggregatorOutput:
        """One glimpse for every row: iterator pass, cache update, aggregator over everything cached.

        Args:
            cache: from :meth:`init_cache`; updated in place.
            pixels: [B, C, s, s] this step's glimpses.
            coords: [B, G, 2] their token coordinates.

        Returns:
            The aggregator's output over every row's cached tokens (see :meth:`aggregate_cache`).
        """
        g2 = cache.tokens_per_glimpse
        if coords.shape[1] != g2 or pixels.shape[0] != cache.batch_size:
            raise ValueError(
                f"this cache holds {cache.batch_size} rows of {g2}-token glimpses, "
                f"got pixels {tuple(pixels.shape)}, coords {tuple(coords.shape)}"
            )
        if (cache.counts >= cache.capacity).any():
            raise ValueError(
                f"the token cache is full ({cache.capacity} glimpses per row): reset the rows before more glimpses"
            )
        cache.append(self.iterate(self.embed_glimpses(pixels, coords), cache.K).to(cache.buf.dtype), coords)
        return self.aggregate_cache(cache)

    def aggregate_cache(self, cache: TokenCache) -> AggregatorOutput:
        """The aggregator over each row's cached tokens (rows with no glimpse give the empty pass).

        Returns:
            :meth:`aggregate` over ``[B, P + L, D]``, L = G times the most glimpses any row holds (rows with
            fewer are masked by ``valid``; see :meth:`TokenCache.filled`).
        """
        seq, coords, valid = cache.filled()
        return self.aggregate(seq, cache.K, coords, valid)

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
        return self.decoder(out.tokens, out.coords, valid, prefix=self.num_prefix, recon=recon, entropy=entropy)

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


def _checked_vit(vit: nn.Module, decoder_pos: str) -> VisionTransformer:
    """``vit`` if TOREViT can wrap it (and ``decoder_pos`` is an order it knows); ValueError naming what is wrong."""
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
    return vit


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
    kwargs = _timm_kwargs(
        dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes), timm_kwargs
    )
    tore = wrap(_create_vit(model, kwargs, pretrained, weights))
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


def _timm_kwargs(overrides: dict[str, Any], timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``timm.create_model`` arguments: the ``overrides`` that are set, then ``timm_kwargs`` (a list
    ``img_size``, as a JSON config gives it, becomes a tuple)."""
    kwargs: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    kwargs.update(timm_kwargs)
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    return kwargs


def _create_vit(model: str, kwargs: dict[str, Any], pretrained: bool, weights: str | None) -> nn.Module:
    """``timm.create_model`` with timm's weights, the file ``weights`` or none; an unknown name raises ValueError."""
    try:
        if weights is not None:
            return timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
        return timm.create_model(model, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm model {model!r}: see timm.list_models('vit*')") from err
        raise
