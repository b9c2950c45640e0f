"""The decoder's masked reconstruction loss in one pass each way, reading the pixels straight from the canvases.

The fused step's reconstruction MSE compares the decoder's prediction for each of the M unseen cells with that
cell's normalised pixels. As PyTorch ops that is a channel-last copy of every patch of every canvas, a gather of the
unseen ones, the normalisation (divide by 255, subtract the channel's mean, divide by its std), a subtraction, a
square and a mean: some 15 memory-bound kernels forward and backward over [B, M, Cpp] fp32 tensors. Here one Triton
pass forward reads pred and the unseen patches' pixels from the canvases and writes one fp32 partial sum of squared
differences per program (summed once by PyTorch), and one pass backward recomputes the target and writes pred's
gradient; nothing of [B, M, Cpp] is stored between them. The target is the formula's arithmetic (fp32 divisions
rounded to nearest, not a reciprocal multiply): it equals PyTorch's on the CPU bit for bit, and on CUDA, where PyTorch
divides by a scalar as a product with its reciprocal, to an fp32 step; the loss differs also in summation order.
Where Triton cannot run, those ops.

Shapes: B canvases of H x W pixels and C channels (uint8, channel-last), patches of patch x patch pixels on a grid of
gw = W // patch columns, M unseen cells per canvas (cell = row * gw + col), Cpp = patch * patch * C prediction
columns in channel-last order within a patch: column j = (py * patch + px) * C + ch.
"""

from __future__ import annotations

from typing import Any

import torch

from avex.kernel_fallback import _device_may_run, triton
from avex.train.glimpse_input import gather_patches
from avex.train.kernels import _works

if triton is not None:
    import triton.language as tl

__all__ = ["masked_pixel_mse"]

# Launch of each pass: (elements per tile: BLOCK_M rows of the padded columns, tiles per program, num_warps).
_FWD_LAUNCH = (2048, 4, 4)
_BWD_LAUNCH = (2048, 1, 4)

if triton is not None:

    @triton.jit
    def _target_tile(
        canvas_ptr, unseen_ptr, mean_ptr, std_ptr, rows64, cols, in_rows, in_cols, M, H, W,
        PATCH: tl.constexpr, C: tl.constexpr,
    ):  # fmt: skip
        # The normalised pixels of the rows' unseen patches, fp32 [BLOCK_M, BLOCK_N]: row r = (b, m) reads cell
        # unseen[b, m] of canvas b; column j its pixel (py, px), channel ch, at canvas[b, row*P + py, col*P + px, ch].
        gw = W // PATCH
        b = rows64 // M
        cell = tl.load(unseen_ptr + rows64, mask=in_rows, other=0)
        base = ((b * H + (cell // gw) * PATCH) * W + (cell % gw) * PATCH) * C  # int64: B x H x W x C can pass 2**31
        ch = cols % C
        pix = cols // C
        offs = (pix // PATCH) * W * C + (pix % PATCH) * C + ch  # within the patch: small, int32
        mask = in_rows[:, None] & in_cols[None, :]
        x = tl.load(canvas_ptr + base[:, None] + offs[None, :], mask=mask, other=0).to(tl.float32)
        mean = tl.load(mean_ptr + ch, mask=in_cols, other=0.0)
        std = tl.load(std_ptr + ch, mask=in_cols, other=1.0)
        # PyTorch's (x / 255 - mean) / std, each division rounded to nearest (Triton's `/` is approximate on CUDA).
        return tl.div_rn(tl.div_rn(x, 255.0) - mean[None, :], std[None, :])

    @triton.jit
    def _masked_pixel_mse_fwd_kernel(
        pred_ptr,
        canvas_ptr,
        unseen_ptr,
        mean_ptr,
        std_ptr,
        partial_ptr,
        R,
        M,
        H,
        W,
        PATCH: tl.constexpr,
        C: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CHUNKS: tl.constexpr,
    ):
        # Program p takes rows [p * CHUNKS * BLOCK_M, (p + 1) * CHUNKS * BLOCK_M) of the R = B * M rows of pred
        # [R, Cpp]; its fp32 sum of squared differences, summed over the tile once at the end, into partial[p].
        pid = tl.program_id(0)
        cpp = PATCH * PATCH * C
        cols = tl.arange(0, BLOCK_N)
        in_cols = cols < cpp
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(CHUNKS):
            rows = (pid * CHUNKS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            in_rows = rows < R
            rows64 = rows.to(tl.int64)  # 64-bit offsets: R x Cpp passes 2**31 at large batches
            mask = in_rows[:, None] & in_cols[None, :]
            pred = tl.load(pred_ptr + rows64[:, None] * cpp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            target = _target_tile(
                canvas_ptr, unseen_ptr, mean_ptr, std_ptr, rows64, cols, in_rows, in_cols, M, H, W, PATCH, C
            )
            d = tl.where(mask, pred - target, 0.0)
            acc += d * d
        tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))

    @triton.jit
    def _masked_pixel_mse_bwd_kernel(
        pred_ptr,
        canvas_ptr,
        unseen_ptr,
        mean_ptr,
        std_ptr,
        dout_ptr,
        dpred_ptr,
        count,
        R,
        M,
        H,
        W,
        PATCH: tl.constexpr,
        C: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # BLOCK_M rows of pred per program: dpred = (dout / count) * 2 * (pred - target) in fp32, rounded once to
        # pred's dtype (PyTorch's mean, square and cast backward give the same: the factor 2 is exact).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cpp = PATCH * PATCH * C
        cols = tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < R, cols < cpp
        rows64 = rows.to(tl.int64)
        mask = in_rows[:, None] & in_cols[None, :]
        offs = rows64[:, None] * cpp + cols[None, :]
        pred = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        target = _target_tile(
            canvas_ptr, unseen_ptr, mean_ptr, std_ptr, rows64, cols, in_rows, in_cols, M, H, W, PATCH, C
        )
        scale = tl.div_rn(tl.load(dout_ptr).to(tl.float32), count) * 2.0
        tl.store(dpred_ptr + offs, (scale * (pred - target)).to(dpred_ptr.dtype.element_ty), mask=mask)


def _blocks(cpp: int, tile: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M): the columns padded to a power of two, and rows enough for a tile of about ``tile``."""
    block_n = triton.next_power_of_2(cpp)
    return block_n, max(1, tile // block_n)


class _MaskedPixelMse(torch.autograd.Function):
    """:func:`masked_pixel_mse` by the Triton kernels; pred's gradient only."""

    @staticmethod
    def forward(
        ctx: Any,
        pred: torch.Tensor,
        canvases: torch.Tensor,
        unseen: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        patch: int,
    ) -> torch.Tensor:
        b, m, cpp = pred.shape
        _, h, w, c = canvases.shape
        pred, canvases, unseen = pred.contiguous(), canvases.contiguous(), unseen.contiguous()
        mean, std = mean.to(torch.float32).contiguous(), std.to(torch.float32).contiguous()
        tile, chunks, warps = _FWD_LAUNCH
        block_n, block_m = _blocks(cpp, tile)
        rows = b * m
        programs = triton.cdiv(rows, block_m * chunks)
        partial = torch.empty(programs, dtype=torch.float32, device=pred.device)
        if programs:
            _masked_pixel_mse_fwd_kernel[(programs,)](
                pred, canvases, unseen, mean, std, partial, rows, m, h, w,
                PATCH=patch, C=c, BLOCK_M=block_m, BLOCK_N=block_n, CHUNKS=chunks, num_warps=warps,
            )  # fmt: skip
        ctx.save_for_backward(pred, canvases, unseen, mean, std)
        ctx.patch = patch
        return partial.sum() / (rows * cpp)  # as PyTorch's mean: the fp32 sum over the count (nan when empty)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None]:
        pred, canvases, unseen, mean, std = ctx.saved_tensors
        b, m, cpp = pred.shape
        _, h, w, c = canvases.shape
        dpred = torch.empty_like(pred)
        tile, _, warps = _BWD_LAUNCH
        block_n, block_m = _blocks(cpp, tile)
        rows = b * m
        if rows:
            _masked_pixel_mse_bwd_kernel[(triton.cdiv(rows, block_m),)](
                pred, canvases, unseen, mean, std, dout.contiguous(), dpred, float(rows * cpp), rows, m, h, w,
                PATCH=ctx.patch, C=c, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            )  # fmt: skip
        return dpred, None, None, None, None, None


def masked_pixel_mse(
    pred: torch.Tensor, canvases: torch.Tensor, unseen: torch.Tensor, patch: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """The mean over all B x M x Cpp elements of ``(pred.float() - target) ** 2``, target the unseen patches' pixels
    normalised per channel, ``(pixel / 255 - mean[ch]) / std[ch]``, with pred's gradient; by one Triton pass each way
    on CUDA (or Triton's interpreter), PyTorch's ops elsewhere.

    Args:
        pred: [B, M, Cpp] float, Cpp = patch * patch * C in channel-last order within a patch.
        canvases: [B, H, W, C] uint8, H and W multiples of ``patch``. unseen: [B, M] int64 grid cells.
        patch: the patch's side in pixels. mean, std: [C] the per-channel pixel statistics (no gradient).

    Returns:
        The fp32 scalar loss.
    """
    _check(pred, canvases, unseen, patch, mean, std)
    takes = _device_may_run(pred) and pred.is_floating_point() and not (mean.requires_grad or std.requires_grad)
    if takes and _works("masked pixel mse", pred, _masked_pixel_mse_trial):
        out: torch.Tensor = _MaskedPixelMse.apply(pred, canvases, unseen, mean, std, patch)
        return out
    return _masked_pixel_mse_torch(pred, canvases, unseen, patch, mean, std)


def _check(
    pred: torch.Tensor, canvases: torch.Tensor, unseen: torch.Tensor, patch: int, mean: torch.Tensor, std: torch.Tensor
) -> None:
    """ValueError naming the first argument whose shape, dtype or device does not fit the others."""
    where = "masked_pixel_mse"
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"{where}: patch must be a positive int, got {patch!r}")
    if canvases.dim() != 4 or canvases.dtype != torch.uint8:
        raise ValueError(
            f"{where}: canvases must be uint8 [B, H, W, C], got {canvases.dtype} of shape {tuple(canvases.shape)}"
        )
    b, h, w, c = canvases.shape
    if h % patch or w % patch:
        raise ValueError(
            f"{where}: canvases must have H and W multiples of patch {patch}, got shape {tuple(canvases.shape)}"
        )
    if unseen.dim() != 2 or unseen.shape[0] != b or unseen.dtype != torch.int64:
        raise ValueError(
            f"{where}: unseen must be int64 [B, M] with B = {b} (canvases' batch), got {unseen.dtype} of shape "
            f"{tuple(unseen.shape)}"
        )
    want = (b, unseen.shape[1], patch * patch * c)
    if tuple(pred.shape) != want or not pred.is_floating_point():
        raise ValueError(
            f"{where}: pred must be float [B, M, patch * patch * C] = {list(want)}, got {pred.dtype} of shape "
            f"{tuple(pred.shape)}"
        )
    for name, stat in (("mean", mean), ("std", std)):
        if tuple(stat.shape) != (c,) or not stat.is_floating_point():
            raise ValueError(
                f"{where}: {name} must be float [C] = [{c}], got {stat.dtype} of shape {tuple(stat.shape)}"
            )
    for name, t in (("canvases", canvases), ("unseen", unseen), ("mean", mean), ("std", std)):
        if t.device != pred.device:
            raise ValueError(f"{where}: {name} must be on pred's device {pred.device}, got {t.device}")


def _masked_pixel_mse_torch(
    pred: torch.Tensor, canvases: torch.Tensor, unseen: torch.Tensor, patch: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """What the kernels compute, by PyTorch's ops: the fused step's gather from channel-last patches."""
    pix = gather_patches(canvases, unseen, patch, channel_last=True)  # [B, M, Cpp] uint8
    pp = patch * patch
    target = (pix.float() / 255.0 - mean.float().repeat(pp)) / std.float().repeat(pp)
    return (pred.float() - target).square().mean()


def _masked_pixel_mse_trial(x: torch.Tensor) -> torch.Tensor:
    # x [2, 5, 48]: 5 predicted 4x4 patches of 3 channels per canvas, cells of an 8x8 canvas's 2x2 grid (repeats).
    canvases = (torch.arange(2 * 8 * 8 * 3, device=x.device) % 251).to(torch.uint8).view(2, 8, 8, 3)
    unseen = torch.arange(10, device=x.device).view(2, 5) % 4
    stats = torch.tensor([0.5, 0.4, 0.3], device=x.device)
    return _MaskedPixelMse.apply(x, canvases, unseen, stats, stats + 0.1, 4)
