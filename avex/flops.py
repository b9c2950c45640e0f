"""Analytic compute of TORE and of full recomputation: the one place that counts operations.

Units: a *multiply-accumulate* (MAC) is one multiply plus one add. **FLOPs = 2 x MACs** here, which is
what ``torch.utils.flop_counter.FlopCounterMode`` reports (fvcore and the papers' "FLOPs" count one
MAC as one "flop": divide ours by 2 to compare with them). Counted: every matrix product, i.e. the
patch projection, qkv / output projections, both attention matmuls (Q K^T and A V), the MLPs, the
classification head and the decoder; not counted: norms, softmax, activations, additions (a few percent
at most, and FlopCounterMode ignores them too).

Step t (1-based) of an episode with G tokens per glimpse and P prefix tokens costs
``embed(G) + K blocks on P+G tokens + (depth-K) blocks on P+t*G tokens + head (+ decoder)``; K=0 is full
recomputation over everything revealed so far (the patch projection of earlier glimpses is reused, as
in AME it would be recomputed: a negligible difference). Step 0 is the empty pass that gives the first
glimpse's entropy map and the reward baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # annotations only: this module stays free of torch and timm at run time
    import torch.nn as nn
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block

    from avex.decoder import _DecoderBlock
    from avex.model import TOREViT

__all__ = ["ViTDims", "block_macs", "episode_flops", "step_flops", "step_macs"]


@dataclass(frozen=True)
class ViTDims:
    """The sizes that decide a TORE ViT's compute."""

    depth: int
    dim: int
    mlp_hidden: int
    num_prefix: int
    patch: int
    in_chans: int
    num_classes: int
    num_patches: int
    decoder_dim: int = 0
    decoder_mlp_hidden: int = 0
    decoder_depth: int = 0

    @classmethod
    def of(cls, model: TOREViT) -> ViTDims:
        """Read the sizes off a :class:`avex.model.TOREViT`."""
        # Module containers type their items as Module: name what a TORE ViT's blocks hold.
        mlp = cast("Mlp", cast("Block", model.vit.blocks[0]).mlp)
        fc1 = cast("nn.Linear", mlp.fc1)  # timm's Mlp is Linear unless built convolutional (not in a ViT)
        dec = model.decoder
        dec_fc1 = None if dec is None else cast("nn.Linear", cast("_DecoderBlock", dec.blocks[0]).mlp[0])
        return cls(
            depth=model.depth,
            dim=model.embed_dim,
            mlp_hidden=fc1.out_features,
            num_prefix=model.num_prefix,
            patch=model.patch,
            in_chans=model.in_chans,
            num_classes=model.num_classes,
            num_patches=model.grid[0] * model.grid[1],
            decoder_dim=dec.dim if dec is not None else 0,
            decoder_mlp_hidden=dec_fc1.out_features if dec_fc1 is not None else 0,
            decoder_depth=len(dec.blocks) if dec is not None else 0,
        )

    @classmethod
    def vit_b16_224(cls, num_classes: int = 1000, decoder: bool = True) -> ViTDims:
        """ViT-B/16 at 224 px with TORE's 1-block, 128-wide decoder (the paper's setting)."""
        return cls(12, 768, 3072, 1, 16, 3, num_classes, 196, *((128, 512, 1) if decoder else (0, 0, 0)))


def block_macs(tokens: int, dim: int, mlp_hidden: int) -> int:
    """MACs of one pre-norm transformer block on ``tokens`` tokens.

    qkv 3*n*d^2 + output projection n*d^2 + Q K^T n^2*d + A V n^2*d + MLP 2*n*d*h.
    """
    return 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * mlp_hidden


def decoder_macs(d: ViTDims, observed_tokens: int, recon: bool = True) -> int:
    """MACs of the glimpse decoder: ``observed_tokens`` projected, then CLS + the N grid cells through its blocks.

    Every block computes q, k, v for all rows (one fused projection). The last block computes outputs for
    the N grid rows only, and with ``recon=False`` (the entropy map alone, as an env runs it) nothing after
    Q K^T: no A V, output projection, MLP or pixel head. This counts the algorithm for one image; a one-block
    decoder's entropy alone is computed from its distinct rows (:meth:`GlimpseDecoder.forward`): a batch of
    B projects 1 + L + N / B rows per image (the N mask rows are shared) where this counts 1 + N.
    """
    if not d.decoder_depth:
        return 0
    seq, n, w = 1 + d.num_patches, d.num_patches, d.decoder_dim
    embed = (1 + observed_tokens) * d.dim * w
    blocks = (d.decoder_depth - 1) * block_macs(seq, w, d.decoder_mlp_hidden)
    blocks += 3 * seq * w * w + n * seq * w  # last block: qkv, Q K^T for the grid rows
    if not recon:
        return embed + blocks
    blocks += n * seq * w + n * w * w + 2 * n * w * d.decoder_mlp_hidden  # A V, projection, MLP
    pred = n * w * d.patch * d.patch * d.in_chans
    return embed + blocks + pred


def step_macs(
    d: ViTDims, t: int, tokens_per_glimpse: int, K: int, decoder: bool = True, recon: bool = True
) -> dict[str, int]:
    """MACs of step ``t`` (t glimpses revealed after it; t=0 is the empty pass), by part.

    ``decoder``: count the glimpse decoder; ``recon=False``: its entropy map only (see :func:`decoder_macs`).

    Returns:
        {"embed", "iterator", "aggregator", "head", "decoder", "total"}
    """
    if not 0 <= K <= d.depth:
        raise ValueError(f"K must be in 0..{d.depth}, got {K}")
    g2, p = tokens_per_glimpse, d.num_prefix
    if t == 0:  # prefix alone through every block
        parts = dict(
            embed=0,
            iterator=K * block_macs(p, d.dim, d.mlp_hidden),
            aggregator=(d.depth - K) * block_macs(p, d.dim, d.mlp_hidden),
        )
    else:
        parts = dict(
            embed=g2 * d.patch * d.patch * d.in_chans * d.dim,
            iterator=K * block_macs(p + g2, d.dim, d.mlp_hidden),
            aggregator=(d.depth - K) * block_macs(p + t * g2, d.dim, d.mlp_hidden),
        )
    parts["head"] = d.dim * d.num_classes
    parts["decoder"] = decoder_macs(d, t * g2, recon) if decoder else 0
    parts["total"] = sum(parts.values())
    return parts


def step_flops(d: ViTDims, t: int, tokens_per_glimpse: int, K: int, decoder: bool = True, recon: bool = True) -> int:
    """FLOPs (2 x MACs) of step ``t``; see :func:`step_macs`."""
    return 2 * step_macs(d, t, tokens_per_glimpse, K, decoder, recon)["total"]


def episode_flops(
    d: ViTDims,
    glimpses: int,
    tokens_per_glimpse: int,
    K: int,
    decoder: bool = True,
    empty_pass: bool = True,
    recon: bool = True,
) -> list[int]:
    """Cumulative FLOPs after each step: element i is steps ``0 (or 1) .. i`` summed.

    Returns:
        list of length ``glimpses + 1`` when ``empty_pass`` (index 0 = empty pass), else ``glimpses``.
    """
    start = 0 if empty_pass else 1
    total, out = 0, []
    for t in range(start, glimpses + 1):
        total += step_flops(d, t, tokens_per_glimpse, K, decoder, recon)
        out.append(total)
    return out
