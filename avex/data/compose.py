"""Cluttered canvases from their integer layouts: an item scaled by nearest neighbour on a black canvas, merged with
clutter fragments cut from other (scaled) items by a pixel-wise max.

Canvas b is black, with item ``index[b]`` scaled ``scale`` times at ``item_yx[b]``; fragment k of it is the
``fragment``-sided square at ``clutter_src_yx[b, k]`` of item ``clutter_index[b, k]`` (scaled; the source counts
scaled pixels), maxed into the canvas at ``clutter_dst_yx[b, k]``: the fields of :class:`Placements`. A max does
not depend on the order of its terms and the item lands on zeros, so each pixel is the max of the item's pixel there
(0 outside the item) and of every fragment's pixel that covers it: the pixels can be computed independently.

Two functions, same results (uint8, bit for bit): :func:`reference_compose` (PyTorch, any device: about 90 small
ops for four fragments, one window of offsets per fragment) and :func:`compose_kernel` (Triton: one launch for the
whole batch, one program per block of one canvas's pixels). A training step composes a batch at every step and the
env at every reset, and on a GPU those small ops' launches, not the pixels, are what composing costs.
:func:`compose_canvases` picks the kernel where it can run.

Shapes: ``N`` items of ``I x I`` pixels, ``B`` canvases of ``side x side``, ``n`` fragments per canvas (0 allowed);
the scaled item's side is ``S = I * scale``, a fragment's ``F = fragment``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from avex.kernel_fallback import _device_may_run, kernel_or_fallback, triton

if triton is not None:
    import triton.language as tl

__all__ = ["Placements", "compose_canvases", "compose_kernel", "reference_compose"]


@dataclass(frozen=True, eq=False)  # eq on tensors would be elementwise
class Placements:
    """Where each of B canvases' pixels come from: int64 tensors on the items' device (the tensor form of
    :class:`avex.data.cluttered.CanvasLayout`, whose fields these are). Iterates over its fields in order."""

    index: torch.Tensor  # [B] the item of each canvas
    item_yx: torch.Tensor  # [B, 2] top-left (row, col) of the scaled item on the canvas
    clutter_index: torch.Tensor  # [B, n] the items the fragments are cut from
    clutter_src_yx: torch.Tensor  # [B, n, 2] top-left of each fragment inside its *scaled* item
    clutter_dst_yx: torch.Tensor  # [B, n, 2] top-left of each fragment on the canvas

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (getattr(self, f.name) for f in fields(self))


# ----------------------------------------------------------------------------------------- the kernel
if triton is not None:

    @triton.jit
    def _compose_kernel(
        images_ptr,
        index_ptr,
        item_yx_ptr,
        clutter_ptr,
        src_ptr,
        dst_ptr,
        out_ptr,
        stride_img_n,
        stride_img_y,
        stride_img_x,
        stride_index,
        stride_item_b,
        stride_item_c,
        stride_clutter_b,
        stride_clutter_k,
        stride_src_b,
        stride_src_k,
        stride_src_c,
        stride_dst_b,
        stride_dst_k,
        stride_dst_c,
        SIDE: tl.constexpr,
        SCALE: tl.constexpr,
        ITEM: tl.constexpr,
        FRAG: tl.constexpr,
        N_FRAG: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program = BLOCK pixels of canvas b: the item's pixel there (or 0), maxed with every covering fragment's.
        b = tl.program_id(0).to(tl.int64)  # int64: b * SIDE * SIDE passes 2**31 at large batches
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = p < SIDE * SIDE
        y = p // SIDE
        x = p % SIDE
        item = tl.load(index_ptr + b * stride_index)  # int64: offsets into the items are int64 too
        dy = y - tl.load(item_yx_ptr + b * stride_item_b)
        dx = x - tl.load(item_yx_ptr + b * stride_item_b + stride_item_c)
        on_item = inside & (dy >= 0) & (dy < ITEM * SCALE) & (dx >= 0) & (dx < ITEM * SCALE)
        # Off the item (masked lanes) dy, dx may be negative: their offsets are never read.
        at = images_ptr + item * stride_img_n + (dy // SCALE) * stride_img_y + (dx // SCALE) * stride_img_x
        pixel = tl.load(at, mask=on_item, other=0)
        for k in range(N_FRAG):  # a loop, not unrolled: n may be in the thousands
            frag_item = tl.load(clutter_ptr + b * stride_clutter_b + k * stride_clutter_k)
            sy = tl.load(src_ptr + b * stride_src_b + k * stride_src_k)
            sx = tl.load(src_ptr + b * stride_src_b + k * stride_src_k + stride_src_c)
            fy = y - tl.load(dst_ptr + b * stride_dst_b + k * stride_dst_k)
            fx = x - tl.load(dst_ptr + b * stride_dst_b + k * stride_dst_k + stride_dst_c)
            on_frag = inside & (fy >= 0) & (fy < FRAG) & (fx >= 0) & (fx < FRAG)
            frag_at = images_ptr + frag_item * stride_img_n
            frag_at += ((sy + fy) // SCALE) * stride_img_y + ((sx + fx) // SCALE) * stride_img_x
            pixel = tl.maximum(pixel, tl.load(frag_at, mask=on_frag, other=0))
        tl.store(out_ptr + b * (SIDE * SIDE) + p, pixel, mask=inside)


def _check(images: torch.Tensor, where: Placements, side: int, scale: int, fragment: int) -> tuple[int, int]:
    """(B, n) of a valid call; ValueError naming what is wrong otherwise. Shapes and dtypes only: the values (items
    in range, windows on the canvas) are the callers' to guarantee."""
    if images.dtype != torch.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be uint8 [N, I, I] (square items), got {images.dtype} {tuple(images.shape)}")
    if not isinstance(where, Placements):
        raise ValueError(f"where must be a Placements of five int64 tensors, got {type(where).__name__}")
    index, item_yx, clutter = where.index, where.item_yx, where.clutter_index
    if index.dtype != torch.int64 or index.ndim != 1:
        raise ValueError(f"index must be int64 [B], got {index.dtype} {tuple(index.shape)}")
    b = index.shape[0]
    if item_yx.dtype != torch.int64 or item_yx.shape != (b, 2):
        raise ValueError(f"item_yx must be int64 [B, 2] = [{b}, 2], got {item_yx.dtype} {tuple(item_yx.shape)}")
    if clutter.dtype != torch.int64 or clutter.ndim != 2 or clutter.shape[0] != b:
        raise ValueError(f"clutter_index must be int64 [B, n] with B = {b}, got {clutter.dtype} {tuple(clutter.shape)}")
    n = clutter.shape[1]
    for name in ("clutter_src_yx", "clutter_dst_yx"):
        yx = getattr(where, name)
        if yx.dtype != torch.int64 or yx.shape != (b, n, 2):
            raise ValueError(f"{name} must be int64 [B, n, 2] = [{b}, {n}, 2], got {yx.dtype} {tuple(yx.shape)}")
    for name, t in zip((f.name for f in fields(where)), where):
        if t.device != images.device:
            raise ValueError(f"{name} is on {t.device}, images on {images.device}: all must be on one device")
    for name, value in (("side", side), ("scale", scale), ("fragment", fragment)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return b, n


def _compose_kernel_unchecked(
    images: torch.Tensor, where: Placements, side: int, scale: int, fragment: int
) -> torch.Tensor:
    """:func:`compose_kernel` of arguments :func:`_check` passed."""
    if triton is None:
        raise RuntimeError("compose_kernel needs Triton (it ships with PyTorch's CUDA wheels)")
    index, item_yx, clutter, src_yx, dst_yx = where
    b, n = clutter.shape
    out = torch.empty(b, side, side, 1, dtype=torch.uint8, device=images.device)  # every pixel is written
    if b == 0:
        return out
    # Where n = 0 the fragment tensors are never read, and may hold no memory at all: index stands in for them.
    frags = (clutter, src_yx, dst_yx) if n else (index, index, index)
    strides = [*clutter.stride(), *src_yx.stride(), *dst_yx.stride()] if n else [0] * 8
    block = min(1024, triton.next_power_of_2(side * side))
    _compose_kernel[(b, triton.cdiv(side * side, block))](  # b on axis 0: the others take at most 65,535
        images,
        index,
        item_yx,
        *frags,
        out,
        *images.stride(),
        index.stride(0),
        *item_yx.stride(),
        *strides,
        SIDE=side,
        SCALE=scale,
        ITEM=images.shape[1],
        FRAG=fragment,
        N_FRAG=n,  # constant: a source's n never changes (and the interpreter loops over constants only)
        BLOCK=block,
        num_warps=4,
    )
    return out


def compose_kernel(images: torch.Tensor, where: Placements, *, side: int, scale: int, fragment: int) -> torch.Tensor:
    """:func:`reference_compose` by the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``), in one launch.
    Args and returns as :func:`reference_compose`; RuntimeError without Triton."""
    _check(images, where, side, scale, fragment)
    return _compose_kernel_unchecked(images, where, side, scale, fragment)


# ------------------------------------------------------------------------------------- the reference
def _reference_unchecked(images: torch.Tensor, where: Placements, side: int, scale: int, fragment: int) -> torch.Tensor:
    """:func:`reference_compose` of arguments :func:`_check` passed."""
    index, item_yx, clutter_index, src_yx, dst_yx = where
    B, N, item_side = len(index), len(images), images.shape[1]  # I
    S, F, s, dev = item_side * scale, fragment, scale, images.device
    # Work on flattened canvases/items: one gather/scatter along dim 1 per step is several
    # times faster than multi-tensor advanced indexing on CPU.
    canvas = torch.zeros(B, side * side, dtype=torch.uint8, device=dev)

    def window(yx: torch.Tensor, size: int, width: int, stride: int = 1) -> torch.Tensor:
        """Flat offsets [B, size*size] of a size x size window at yx [B, 2] in rows of `width`.

        With ``stride`` s, offsets address the unscaled pixel (r // s, c // s) instead.
        """
        r = torch.arange(size, device=dev)
        ys = (yx[:, 0:1] + r) // stride  # [B, size]
        xs = (yx[:, 1:2] + r) // stride
        return (ys[:, :, None] * width + xs[:, None, :]).reshape(B, size * size)  # not -1: B may be 0

    item = images[index]  # [B, I, I]
    if s > 1:  # nearest-neighbour upscaling
        item = item.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
    canvas.scatter_(1, window(item_yx, S, side), item.reshape(B, S * S))

    flat_items = images.reshape(N, item_side * item_side)  # a view of the (contiguous) items
    for k in range(clutter_index.shape[1]):
        # Fragment pixels read straight from the unscaled source item, scaled on the fly.
        frag = torch.gather(flat_items[clutter_index[:, k]], 1, window(src_yx[:, k], F, item_side, s))
        dst = window(dst_yx[:, k], F, side)
        # gather/max/scatter rather than scatter_reduce_("amax"): plain ops work for uint8 on every backend.
        canvas.scatter_(1, dst, torch.maximum(torch.gather(canvas, 1, dst), frag))
    return canvas.view(B, side, side, 1)


def reference_compose(images: torch.Tensor, where: Placements, *, side: int, scale: int, fragment: int) -> torch.Tensor:
    """Compose B canvases with PyTorch's ops (any device): batched gathers and scatters, one pass per fragment.

    Values are not checked: item indices must lie in ``[0, N)``, ``item_yx`` in ``[0, side - S]``,
    ``clutter_src_yx`` in ``[0, S - F]`` and ``clutter_dst_yx`` in ``[0, side - F]``.

    Args:
        images: uint8 [N, I, I] the items.
        where: the :class:`Placements` of the B canvases' item and n fragments.
        side: the canvas side.
        scale: the items' integer upscaling (nearest neighbour).
        fragment: the fragments' side F.

    Returns:
        uint8 [B, side, side, 1] the canvases.
    """
    _check(images, where, side, scale, fragment)
    return _reference_unchecked(images, where, side, scale, fragment)


# -------------------------------------------------------------------------------------------- dispatch
def compose_canvases(images: torch.Tensor, where: Placements, *, side: int, scale: int, fragment: int) -> torch.Tensor:
    """:func:`compose_kernel` where it can run (Triton, and CUDA or the interpreter; grad mode does not matter: the
    canvases are integers), else :func:`reference_compose`; if the kernel fails to build or launch here, the
    reference from then on, with one warning. Args and returns as :func:`reference_compose`."""
    _check(images, where, side, scale, fragment)
    if not _device_may_run(where.index):
        return _reference_unchecked(images, where, side, scale, fragment)
    return kernel_or_fallback(
        "canvas compose",
        lambda: _compose_kernel_unchecked(images, where, side, scale, fragment),
        lambda: _reference_unchecked(images, where, side, scale, fragment),
        "canvases are now composed with PyTorch's ops, with the same results but slower.",
    )
