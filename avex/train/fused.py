"""The training loss of :class:`~avex.train.objective.TOREObjective` in fewer, larger kernels (``--fused-step``).

The same function of the same weights, computed the way a GPU likes it:

* **one compute dtype** (bf16 on CUDA under ``--amp``): every weight is cast once per step, all of them in
  one kernel (:func:`~avex.train.flat.cast_params`, whose backward returns every fp32 gradient in one buffer,
  where a run of several processes averages them: ``grad_reduce``), and the
  residual stream, the layer norms and the attention stay in it; PyTorch's autocast would instead run each
  layer norm in fp32 and cast its input and output around every matrix product;
* **residual adds** in the pass of the layer norm that reads the sum next (the block's second norm, the next
  block's first, the final norm), with the bias of the layer before them and the layer scale, forward and
  backward (:mod:`avex.train.epilogue`): a block hands its last add, pending, to the next;
* **attention** for the short rows of the iterator and the aggregator by the Triton kernels of
  :mod:`avex.train.kernels` (forward and backward), PyTorch's fused SDPA for longer rows;
* **the iterator's input** ``[prefix, glimpse tokens + their positions]`` as one matrix product: one Triton pass
  writes each row's normalised pixels straight from the canvases beside a one-hot of its cell (or prefix slot) and a
  1, and the product's weight holds the patch projection, the position table, the prefix tokens and the bias, whose
  gradients are then one weight-gradient product (:mod:`avex.train.glimpse_input`);
* **bias gradients** of the layers after a norm (qkv, fc1, the decoder's embedding and pixel head) as one more column
  of their weight gradients' products: the norms store their output beside a column of ones
  (:func:`~avex.train.rows.train_linear`'s ``ones=True``), so no separate pass sums the output's gradient;
* **the decoder's input** ``[CLS, seen tokens, mask tokens]`` with their positions in one Triton pass each way
  (:mod:`avex.train.decoder_input`);
* **the aggregator's input** ``[prefix averaged over the glimpses, every glimpse's tokens]`` in one Triton pass each
  way (:mod:`avex.train.aggregator_input`);
* **the reconstruction loss** in one Triton pass each way, the unseen patches' pixels read straight from the
  canvases (:mod:`avex.train.recon_loss`);
* **the decoder** queries only the patches the loss reads: its last block attends from the unseen patches
  (every key still counts) and the pixel head runs on them alone. The training glimpses never overlap
  (:func:`~avex.train.policy.sample_glimpses`), so each image has exactly ``N - T*G`` unseen patches and the
  shapes stay static (one CUDA graph per (K, T) captures it, :class:`~avex.train.step.GraphedStep`).

On the CPU in fp32 it gives :class:`TOREObjective`'s loss and gradients up to float rounding
(``tests/test_train_step.py``, ``tests/test_train_fused_ls.py``). It covers the plain timm ViT that avex trains
and DeiT-III's, whose blocks scale each branch by a learned per-channel ``gamma`` (timm's LayerScale,
``x + ls(branch(norm(x)))``): gamma is cast with the other weights and applied with the residual add
(:func:`fused_refusal` says why any other model is refused; ``--fused-step auto`` then runs the eager step).

Shapes: B batch, T glimpses, G = g*g tokens per glimpse, L = T*G seen patches, M = N - L unseen, N grid
patches, P prefix tokens, D width, Cpp = C*p*p pixels per patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, DropPath, LayerScale, Mlp
from timm.models.vision_transformer import Block

from avex.attention import _plain_block
from avex.decoder import _DecoderBlock
from avex.embedding import _is_patch_linear
from avex.geometry import GlimpseGeometry
from avex.model import TOREViT
from avex.train.aggregator_input import aggregator_input
from avex.train.decoder_input import decoder_input
from avex.train.epilogue import train_residual, train_residual_norm
from avex.train.flat import GradReduce, cast_params
from avex.train.glimpse_input import glimpse_rows, glimpse_weight
from avex.train.kernels import train_attention
from avex.train.recon_loss import masked_pixel_mse
from avex.train.rows import train_layer_norm, train_linear

__all__ = ["FusedObjective", "fused_refusal"]


@dataclass(frozen=True)
class _BlockSpec:
    """The parameter names of one pre-norm transformer block (timm's ``Block`` or the decoder's)."""

    prefix: str  # "vit.blocks.3." or "decoder.blocks.0."
    norm1: str
    qkv: str
    proj: str
    norm2: str
    fc1: str
    fc2: str
    eps1: float
    eps2: float
    heads: int
    ls1: str | None = None  # "ls1.gamma" where the block has timm's LayerScale after its attention, else None
    ls2: str | None = None  # "ls2.gamma": after its MLP


def _spec(prefix: str, blk: nn.Module, qkv: str, proj: str, fc1: str, fc2: str, heads: int) -> _BlockSpec:
    norm1, norm2 = cast(nn.LayerNorm, blk.norm1), cast(nn.LayerNorm, blk.norm2)
    ls1, ls2 = (f"{n}.gamma" if isinstance(getattr(blk, n, None), LayerScale) else None for n in ("ls1", "ls2"))
    return _BlockSpec(prefix, "norm1", qkv, proj, "norm2", fc1, fc2, norm1.eps, norm2.eps, heads, ls1, ls2)


def _active(m: nn.Module) -> str | None:
    """How ``m`` changes its input in training (``"Dropout(p=0.1)"``), or None for what the fused step leaves
    out: an Identity, a dropout of p=0 or a drop path of drop_prob=0."""
    if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0):
        return None
    if isinstance(m, DropPath) and m.drop_prob == 0:
        return None
    if isinstance(m, nn.Dropout):
        return f"Dropout(p={m.p:g})"
    if isinstance(m, DropPath):
        return f"DropPath(drop_prob={m.drop_prob:g})"
    return f"a {type(m).__name__}"


def _first_active(owner: str, checks: list[tuple[str, nn.Module, str]]) -> str | None:
    """The refusal for the first active module of ``checks`` (attribute, module, the timm argument that
    leaves it out), or None."""
    for attr, m, fix in checks:
        what = _active(m)
        if what:
            return f"{owner}'s {attr} is {what}, which the fused step does not compute; build the model with {fix}"
    return None


def _block_refusal(i: int, blk: nn.Module) -> str | None:
    if not _plain_block(blk):
        return f"block {i} is a {type(blk).__name__} with other attention than timm's plain Attention"
    b, attn = blk, cast(Attention, blk.attn)
    mlp = b.mlp
    if not (isinstance(b.norm1, nn.LayerNorm) and isinstance(b.norm2, nn.LayerNorm)):
        return f"block {i} normalises with {type(b.norm1).__name__}, not LayerNorm"
    if not (isinstance(mlp, Mlp) and isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
        return f"block {i}'s MLP is not timm's Mlp with exact GELU"
    for name in ("ls1", "ls2"):  # timm's LayerScale (x * gamma) is computed; anything else there is not
        ls = getattr(b, name)
        if not isinstance(ls, (nn.Identity, LayerScale)):
            return f"block {i}'s {name} is a {type(ls).__name__}; the fused step computes timm's LayerScale only"
    # timm's Block passes proj_drop_rate to the MLP's dropouts too.
    checks: list[tuple[str, nn.Module, str]] = [
        ("drop_path1", b.drop_path1, "timm's drop_path_rate=0"),
        ("drop_path2", b.drop_path2, "timm's drop_path_rate=0"),
        ("attn.attn_drop", attn.attn_drop, "timm's attn_drop_rate=0"),
        ("attn.proj_drop", attn.proj_drop, "timm's proj_drop_rate=0"),
        ("mlp.drop1", mlp.drop1, "timm's proj_drop_rate=0"),
        ("mlp.drop2", mlp.drop2, "timm's proj_drop_rate=0"),
        ("attn.norm", attn.norm, "timm's scale_attn_norm=False"),
        ("mlp.norm", mlp.norm, "timm's scale_mlp_norm=False"),
    ]
    return _first_active(f"block {i}", checks)


def fused_refusal(model: TOREViT) -> str | None:
    """Why :class:`FusedObjective` cannot compute ``model``'s loss, or None when it can.

    It covers timm ViTs with plain pre-norm blocks (LayerNorm, timm's Attention, an exact-GELU MLP, timm's
    LayerScale or none, no dropout or drop path), a plain stride-p patch projection, CLS pooling and no extra
    norms: DeiT-III (``deit3_*``) among them. A refusal names the module, its setting and the timm argument
    that leaves it out (``drop_path_rate=0``, ...).
    """
    vit = model.vit
    if not _is_patch_linear(vit.patch_embed.proj, model.patch):
        return "the patch projection is not a plain stride-p convolution"
    if vit.global_pool != "token":
        return f"global_pool is {vit.global_pool!r}, not 'token'"
    checks: list[tuple[str, nn.Module, str]] = [
        ("patch_embed.norm", vit.patch_embed.norm, "timm's embed_norm_layer=None"),
        ("norm_pre", vit.norm_pre, "timm's pre_norm=False"),
        ("pos_drop", vit.pos_drop, "timm's pos_drop_rate=0"),
        ("fc_norm", vit.fc_norm, "timm's fc_norm=False"),
        ("head_drop", vit.head_drop, "timm's drop_rate=0"),
    ]
    refusal = _first_active("the ViT", checks)
    if refusal:
        return refusal
    if not isinstance(vit.norm, nn.LayerNorm):
        return f"the final norm is {type(vit.norm).__name__}, not LayerNorm"
    for i, blk in enumerate(vit.blocks):
        refusal = _block_refusal(i, blk)
        if refusal:
            return refusal
    return None


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, ones: bool = False) -> torch.Tensor:
    """Linear layer ``name``; ``ones``: x is a norm's output (:func:`_norm`), its bias gradient then inside the
    weight gradient's product (:func:`~avex.train.rows.train_linear`)."""
    return train_linear(x, w[name + ".weight"], w[name + ".bias"], ones=ones)


def _product(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Linear layer ``name`` without its bias: the pass that follows adds it (:mod:`avex.train.epilogue`)."""
    return F.linear(x, w[name + ".weight"])


@dataclass(frozen=True)
class _Pending:
    """A branch's residual add, not yet done: ``x + (y + b) * gamma`` (gamma None: ``x + y + b``), y a linear
    layer's product without its bias b. What reads the sum next does the add in its own pass: a layer norm
    (:func:`_norm`) or, where the sum itself is read first, :func:`_settle`."""

    x: torch.Tensor  # [B, S, D] the residual stream
    y: torch.Tensor  # [B, S, D]
    b: torch.Tensor  # [D]
    gamma: torch.Tensor | None  # [D] timm's LayerScale, or None


_Stream: TypeAlias = torch.Tensor | _Pending  # the residual stream [B, S, D], or the add that makes it


def _branch(
    x: torch.Tensor, y: torch.Tensor, w: dict[str, torch.Tensor], p: str, linear: str, ls: str | None
) -> _Pending:
    """The add to x of y, the product of block ``p``'s layer ``linear``, with that layer's bias and the block's
    layer scale ``ls`` (None: none)."""
    return _Pending(x, y, w[p + linear + ".bias"], w[p + ls] if ls else None)


def _norm(x: _Stream, w: dict[str, torch.Tensor], name: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the residual stream, layer norm ``name`` of it) [B, S, D], a pending add done in the norm's pass. Every
    norm of the step feeds a linear layer, so its output is stored beside a column of ones (``ones=True``): that
    layer's bias gradient is then a column of its weight gradient's product (``_linear(..., ones=True)``)."""
    weight, bias = w[name + ".weight"], w[name + ".bias"]
    if isinstance(x, torch.Tensor):
        return x, train_layer_norm(x, weight, bias, eps, ones=True)
    return train_residual_norm(x.x, x.y, x.b, x.gamma, weight, bias, eps, ones=True)


def _settle(x: _Stream) -> torch.Tensor:
    """The residual stream [B, S, D] itself, a pending add done."""
    return x if isinstance(x, torch.Tensor) else train_residual(x.x, x.y, x.b, x.gamma)


def _block(x: _Stream, w: dict[str, torch.Tensor], s: _BlockSpec, first: int = 0) -> _Pending:
    """One pre-norm block on [B, S, D] (or the previous block's pending add); the rows before ``first`` are keys
    only. Returns its MLP branch's add, pending, over [B, S - first, D]."""
    p = s.prefix
    x, n = _norm(x, w, p + s.norm1, s.eps1)
    a = _product(train_attention(_linear(n, w, p + s.qkv, ones=True), s.heads, first), w, p + s.proj)
    x, n = _norm(_branch(x[:, first:], a, w, p, s.proj, s.ls1), w, p + s.norm2, s.eps2)
    h = F.gelu(_linear(n, w, p + s.fc1, ones=True))
    return _branch(x, _product(h, w, p + s.fc2), w, p, s.fc2, s.ls2)


def _heads(blk: nn.Module) -> int:
    """Attention heads of a timm Block or a decoder block."""
    if isinstance(blk, _DecoderBlock):
        return blk.heads
    return int(cast(Attention, cast(Block, blk).attn).num_heads)


class FusedObjective(nn.Module):
    """:class:`~avex.train.objective.TOREObjective`'s loss with fewer, larger kernels (see the module doc).

    ``forward(canvases [B,H,W,C] uint8, labels [B], rows [B,T], cols [B,T], K)`` returns ``(loss, ce, mse,
    logits)``, the last three detached, as TOREObjective's does. The glimpses must not overlap (those of
    :func:`~avex.train.policy.sample_glimpses` never do).

    Args:
        dtype: the compute dtype (bf16 on CUDA under ``--amp``, else the parameters' fp32).
        grad_reduce: called in backward on the flat fp32 gradient of every parameter, in place, before the
            parameters get it (:func:`avex.train.allreduce.average_gradients` under DDP); None: nothing.

    Raises:
        ValueError: a model :func:`fused_refusal` refuses.
    """

    _cell_offsets: torch.Tensor  # buffers, see __init__
    _col_scale: torch.Tensor
    _col_shift: torch.Tensor

    def __init__(
        self,
        model: TOREViT,
        geo: GlimpseGeometry,
        recon_weight: float = 0.1,
        label_smoothing: float = 0.0,
        dtype: torch.dtype = torch.float32,
        grad_reduce: GradReduce | None = None,
    ) -> None:
        super().__init__()
        refusal = fused_refusal(model)
        if refusal:
            raise ValueError(f"the fused training step cannot run this model: {refusal}; use --fused-step off")
        self.model, self.geo, self.dtype, self.grad_reduce = model, geo, dtype, grad_reduce
        self.recon_weight, self.label_smoothing = recon_weight, label_smoothing
        vit = model.vit
        self._specs = [
            _spec(f"vit.blocks.{i}.", b, "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", _heads(b))
            for i, b in enumerate(vit.blocks)
        ]
        dec = model.decoder
        self._decoding = bool(recon_weight) and dec is not None
        dec_blocks = list(dec.blocks) if dec is not None else []
        self._dec_specs = [
            _spec(f"decoder.blocks.{i}.", b, "qkv", "proj", "mlp.0", "mlp.2", _heads(b))
            for i, b in enumerate(dec_blocks)
        ]
        # The parameters a step uses (the decoder's only when its loss term is on: the eager step leaves them
        # without a gradient otherwise, and AdamW then skips them).
        self._names = [n for n, p in model.named_parameters() if self._decoding or not n.startswith("decoder.")]
        device = vit.pos_embed.device if vit.pos_embed is not None else torch.device("cpu")
        g, gw = geo.glimpse, model.grid[1]
        off = torch.arange(g, device=device)
        # Grid cell of each glimpse token relative to its top-left, row-major (GlimpseGeometry.glimpse_coords).
        self.register_buffer("_cell_offsets", off.repeat_interleave(g) * gw + off.repeat(g), persistent=False)
        pp = model.patch * model.patch
        # Normalisation per pixel column, channel-major as the patch projection's rows.
        self.register_buffer("_col_scale", model._pixel_scale_u8.flatten().repeat_interleave(pp), persistent=False)
        self.register_buffer("_col_shift", model._pixel_shift.flatten().repeat_interleave(pp), persistent=False)

    def _weights(self) -> dict[str, torch.Tensor]:
        """Name -> the parameter in the compute dtype (through one cast with autograd)."""
        params = dict(self.model.named_parameters())
        cast_ = cast_params([params[n] for n in self._names], self.dtype, self.grad_reduce)
        return dict(zip(self._names, cast_))

    def _embed(self, w: dict[str, torch.Tensor], canvases: torch.Tensor, cells: torch.Tensor, t: int) -> torch.Tensor:
        """[B*T, P + G, D] the iterator's input: [prefix, glimpse tokens + their position embedding], as one product
        (:mod:`avex.train.glimpse_input`)."""
        model, vit = self.model, self.model.vit
        d, n_pre = model.embed_dim, model.num_prefix
        pos = w["vit.pos_embed"][0]  # [N (+ P), D]: as GlimpseViT._patch_pos_table
        table = pos if vit.no_embed_class else pos[n_pre:]
        prefix = w["vit.cls_token"][0]
        if vit.reg_token is not None:
            prefix = torch.cat([prefix, w["vit.reg_token"][0]])
        if not vit.no_embed_class:
            prefix = prefix + pos[:n_pre]
        rows = glimpse_rows(canvases, cells, t, n_pre, model.patch, self._col_scale, self._col_shift, self.dtype)
        proj = w["vit.patch_embed.proj.weight"].reshape(d, -1)
        weight = glimpse_weight(proj, w["vit.patch_embed.proj.bias"], table, prefix, rows.shape[1])
        return F.linear(rows, weight).view(canvases.shape[0] * t, -1, d)

    def forward(
        self, canvases: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, K: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        K = model.check_k(K)
        if canvases.ndim != 4 or rows.ndim != 2 or rows.shape != cols.shape or rows.shape[0] != canvases.shape[0]:
            raise ValueError(
                f"expected canvases [B, H, W, C], rows and cols [B, T], got {tuple(canvases.shape)}, "
                f"{tuple(rows.shape)} and {tuple(cols.shape)}"
            )
        w = self._weights()
        b, t = rows.shape
        n_pre, gw = model.num_prefix, model.grid[1]
        cells = ((rows * gw + cols)[..., None] + self._cell_offsets).reshape(b, -1)  # [B, L]
        stream: _Stream = self._embed(w, canvases, cells, t)
        for spec in self._specs[:K]:  # the iterator: each glimpse alone
            stream = _block(stream, w, spec)
        x = _settle(stream)
        stream = aggregator_input(x.view(b, t, *x.shape[1:]), n_pre)
        for spec in self._specs[K:]:  # the aggregator: [mean prefix, every glimpse's tokens]
            stream = _block(stream, w, spec)
        _, x = _norm(stream, w, "vit.norm", cast(nn.LayerNorm, model.vit.norm).eps)
        logits = _linear(x[:, 0], w, "vit.head")
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        mse = ce.new_zeros(())
        if self._decoding and cells.shape[1] < model.grid[0] * model.grid[1]:  # some patch unseen
            mse = self._recon_mse(w, x, canvases, cells)
        loss = ce + self.recon_weight * mse
        return loss, ce.detach(), mse.detach(), logits.detach()

    def _recon_mse(
        self,
        w: dict[str, torch.Tensor],
        x: torch.Tensor,
        canvases: torch.Tensor,
        cells: torch.Tensor,
    ) -> torch.Tensor:
        """The masked reconstruction MSE from the normalised aggregator tokens ``x`` [B, P + L, D].

        The decoder's sequence is [CLS, seen tokens, mask tokens of the unseen cells], each grid row with its
        cell's sin-cos position: attention does not depend on the order of its rows, so this is the eager
        decoder's [CLS, grid] reordered. Its last block queries only the M unseen cells.
        """
        model, dec = self.model, cast(nn.Module, self.model.decoder)
        b, n_seen = cells.shape
        n_pre, n = model.num_prefix, model.grid[0] * model.grid[1]
        rows = x if n_pre == 1 else torch.cat([x[:, :1], x[:, n_pre:]], dim=1)
        e = _linear(rows, w, "decoder.embed", ones=True)  # [B, 1 + L, dd]
        pos = cast(torch.Tensor, dec.grid_pos)[0].to(e.dtype)  # [N, dd]
        seen = torch.zeros(b, n, dtype=torch.uint8, device=cells.device).scatter_(1, cells, 1)
        unseen = torch.sort(seen, dim=1, stable=True).indices[:, : n - n_seen]  # [B, M], ascending
        seq: _Stream = decoder_input(e, cells, unseen, pos, w["decoder.mask_token"])  # [B, 1 + L + M, dd]
        for spec in self._dec_specs[:-1]:
            seq = _block(seq, w, spec)
        out = _block(seq, w, self._dec_specs[-1], first=1 + n_seen)  # [B, M, dd], pending
        normed = _norm(out, w, "decoder.norm", cast(nn.LayerNorm, dec.norm).eps)[1]
        pred = _linear(normed, w, "decoder.pred", ones=True)
        mean, std = model.pixel_mean.flatten(), model.pixel_std.flatten()  # [C]: TOREViT.normalize's statistics
        return masked_pixel_mse(pred, canvases, unseen, model.patch, mean, std)
