"""Fast layer norm for many short rows: a Triton forward that takes many rows per program.

An env step normalises ~1M rows of 192 features at once (16,384 envs x 49 aggregator tokens), and the decoder
~3M rows of 128. PyTorch's layer norm kernel takes one row per block: at such widths its fixed cost per row,
not the memory bandwidth, sets the pace (a fifth to a quarter of the H200's bandwidth; a third of an env
step's kernel time). :func:`layer_norm_forward` gives every program a tile of about 4,096 elements (16 rows of
192, 4 of 768), mean and variance in fp32. Training puts it under autograd (:mod:`avex.train.rows`);
inference calls :func:`norm_forward` on a norm module, which takes the kernel where it applies (CUDA or
Triton's interpreter, no autograd, at least :data:`MIN_ROWS` rows or any number inside a CUDA graph capture, a
plain affine LayerNorm) and the module itself everywhere else: on CPU the results are the module's, bit for bit.

A pre-norm block's residual add and the norm that reads its sum next run as one pass too
(:func:`residual_norm_forward`): the fused training step and the inference blocks of
:func:`avex.attention.fused_blocks` (through :func:`residual_norm`) share it.

Shapes: M rows, N features.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
from timm.layers import LayerNorm as TimmLayerNorm

from avex.kernel_fallback import _kernel_may_run, kernel_or_fallback, triton

if triton is not None:
    import triton.language as tl

__all__ = [
    "MAX_FEATURES",
    "MIN_ROWS",
    "ONES_COLUMNS",
    "launch_pays",
    "layer_norm",
    "layer_norm_forward",
    "norm_applies",
    "norm_forward",
    "residual_norm",
    "residual_norm_forward",
]

MAX_FEATURES = 8192  # the widest row norm_forward sends to the kernel (one row then fills a program's tile)
# Fewer rows go to PyTorch's kernel when launched from Python: both kernels are then a few microseconds on the GPU,
# and PyTorch's launches faster (15 against 45 us, a single env at batch 1). Inside a CUDA graph capture there is no
# launch to pay at replay, and the kernel takes any row count (2.2 against 3.3 us at 64 rows of 192:
# benchmarks/results/env_kernels/env_kernels.md).
MIN_ROWS = 2048
# Elements of a residual norm's tile (timed with the training's launches: avex.train.rows.ROW_LAUNCH, which reads it).
RESIDUAL_TILE = 2048
_ROWS = 128  # the most rows per program (the reductions over rows of avex.train.rows take this many)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NORMS = (nn.LayerNorm, TimmLayerNorm)  # F.layer_norm over the last axis: the kernel's arithmetic
# Columns stored beside each row of an output asked for ``ones=True``: a 1, then zeros (16-byte aligned rows in
# any dtype). A linear layer that reads such rows gets its bias gradient as one more column of its weight gradient's
# product (avex.train.rows.train_linear), instead of a separate pass over its output's gradient.
ONES_COLUMNS = 8


if triton is not None:

    @triton.jit
    def _normalize_rows(x, mask, w_ptr, b_ptr, cols, in_cols, N, eps):
        """A layer norm of the rows of an fp32 tile x [BLOCK_M, BLOCK_N] whose masked elements are 0: (the normed
        tile times the weight plus the bias, each row's mean, each row's 1/std), all fp32, two passes over each row
        in registers. Shared with the training kernels that norm a tile they computed (avex.train.epilogue)."""
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        w = tl.load(w_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
        return xc * rstd[:, None] * w[None, :] + b[None, :], mean, rstd

    @triton.jit
    def _store_ones(y_ptr, rows64, in_rows, stride_y, N, BLOCK_M: tl.constexpr, ONES: tl.constexpr):
        """Columns N .. N + ONES - 1 of the given rows of y: a 1, then zeros (see :data:`ONES_COLUMNS`). Shared with
        the residual norm's forward (avex.train.epilogue)."""
        pad = tl.arange(0, ONES)
        ones = tl.zeros([BLOCK_M, ONES], dtype=tl.float32) + tl.where(pad == 0, 1.0, 0.0)[None, :]
        offs = rows64[:, None] * stride_y + N + pad[None, :]
        tl.store(y_ptr + offs, ones.to(y_ptr.dtype.element_ty), mask=in_rows[:, None])

    @triton.jit
    def _layer_norm_fwd_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        mean_ptr,
        rstd_ptr,
        M,
        N,
        seq,
        stride_xb,
        stride_xs,
        stride_y,
        eps,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STATS: tl.constexpr,
        ONES: tl.constexpr,
    ):
        # BLOCK_M rows per program of x (row r at (r // seq) * stride_xb + (r % seq) * stride_xs, unit column stride)
        # into y (rows stride_y apart); mean and 1/std per row in fp32 (_normalize_rows), stored when STATS; ONES
        # columns after each row's N.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < M, cols < N
        mask = in_rows[:, None] & in_cols[None, :]
        rows64 = rows.to(tl.int64)  # 64-bit offsets: rows x N passes 2**31 at large batches
        x_rows = (rows64 // seq) * stride_xb + (rows64 % seq) * stride_xs
        x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y, mean, rstd = _normalize_rows(x, mask, w_ptr, b_ptr, cols, in_cols, N, eps)
        tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        if ONES > 0:
            _store_ones(y_ptr, rows64, in_rows, stride_y, N, BLOCK_M, ONES)
        if STATS:
            tl.store(mean_ptr + rows, mean, mask=in_rows)
            tl.store(rstd_ptr + rows, rstd, mask=in_rows)

    @triton.jit
    def _residual_norm_fwd_kernel(
        x_ptr,
        y_ptr,
        b_ptr,
        g_ptr,
        w_ptr,
        nb_ptr,
        z_ptr,
        n_ptr,
        mean_ptr,
        rstd_ptr,
        M,
        N,
        seq,
        stride_xb,
        stride_xs,
        stride_n,
        eps,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GAMMA: tl.constexpr,
        NORM: tl.constexpr,
        ONES: tl.constexpr,
    ):
        # BLOCK_M rows per program. Row r of x lies at (r // seq) * stride_xb + (r % seq) * stride_xs (a slice of
        # tokens x[:, first:] read in place); y and z are contiguous [M, N], n's rows stride_n apart, each followed
        # by ONES columns (a 1, then zeros: avex.layer_norm.ONES_COLUMNS). z is rounded to its dtype once and the
        # norm (NORM) taken of that rounded z: backward reads the stored z, and so saw the eager step's norm.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < M, cols < N
        mask = in_rows[:, None] & in_cols[None, :]
        rows64 = rows.to(tl.int64)  # 64-bit offsets: rows x N passes 2**31 at large batches
        x_rows = (rows64 // seq) * stride_xb + (rows64 % seq) * stride_xs
        x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        offs = rows64[:, None] * N + cols[None, :]
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y += tl.load(b_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        if GAMMA:
            y *= tl.load(g_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        z = (x + y).to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + offs, z, mask=mask)
        if NORM:
            out, mean, rstd = _normalize_rows(z.to(tl.float32), mask, w_ptr, nb_ptr, cols, in_cols, N, eps)
            tl.store(n_ptr + rows64[:, None] * stride_n + cols[None, :], out.to(n_ptr.dtype.element_ty), mask=mask)
            if ONES > 0:
                _store_ones(n_ptr, rows64, in_rows, stride_n, N, BLOCK_M, ONES)
            tl.store(mean_ptr + rows, mean, mask=in_rows)
            tl.store(rstd_ptr + rows, rstd, mask=in_rows)


def _row_blocks(n: int, tile: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_M) of the kernels over rows of n features: a tile of about ``tile`` elements."""
    block_n = triton.next_power_of_2(n)
    return block_n, max(1, min(_ROWS, tile // block_n))


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    stats: bool,
    block_m: int | None,
    num_warps: int | None,
    ones: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """y shaped as ``x``, and fp32 mean and 1/std per row when ``stats``; see :func:`layer_norm_forward`."""
    if triton is None:
        raise RuntimeError("layer_norm_forward needs Triton (it ships with PyTorch's CUDA wheels)")
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        got = f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        raise ValueError(f"weight and bias must be [{n}] (x's last axis), got {got}")
    x2, seq, stride_xb, stride_xs = _rows_in_place(x)  # a CLS token's rows, or the tokens a cache holds: no copy
    m = x.numel() // n if n else 0
    block_n, default_m = _row_blocks(n, 4096)
    block_m = block_m or default_m
    if block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    pad = ONES_COLUMNS if ones else 0
    y = torch.empty(m, n + pad, device=x.device, dtype=x.dtype)[:, :n]
    mean = torch.empty(m, dtype=torch.float32, device=x.device) if stats else None
    rstd = torch.empty_like(mean) if mean is not None else None
    if m:
        _layer_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
            x2, weight.contiguous(), bias.contiguous(), y, mean if stats else y, rstd if stats else y,
            m, n, seq, stride_xb, stride_xs, y.stride(0), eps, BLOCK_M=block_m, BLOCK_N=block_n, STATS=stats, ONES=pad,
            num_warps=num_warps or 4,
        )  # fmt: skip
    return y.view(x.shape), mean, rstd


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
    ones: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer norm over the last axis by a Triton kernel that takes many short rows per program (PyTorch's takes
    one row per block: at 192 features its fixed cost per row, not the bandwidth, sets the pace). No autograd
    (:func:`avex.train.rows.train_layer_norm` adds it).

    Args:
        x: [..., N] fp16, bf16 or fp32 on CUDA (or CPU under Triton's interpreter); any strides (a [M, N] or
            [B, S, N] of unit feature stride is read in place, others copied first: see :func:`_rows_in_place`).
        weight, bias: [N].
        eps: added to the variance.
        block_m, num_warps: launch settings (rows per program, a power of two; warps); None: a tile of about
            4,096 elements, 4 warps.
        ones: store y's rows N + :data:`ONES_COLUMNS` apart, each followed by a 1 and zeros (y is then a view of
            those rows; see :data:`ONES_COLUMNS`); False: y contiguous.

    Returns:
        y shaped as ``x`` in x's dtype; mean and 1/std, fp32, one per row (as ``torch.native_layer_norm``'s,
        flattened).
    """
    y, mean, rstd = _forward(x, weight, bias, eps, True, block_m, num_warps, ones)
    assert mean is not None and rstd is not None
    return y, mean, rstd


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """:func:`layer_norm_forward`'s y alone (no per-row statistics written): inference.

    Args and y as :func:`layer_norm_forward`.
    """
    return _forward(x, weight, bias, eps, False, block_m, num_warps)[0]


def _rows_in_place(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x [..., N] for the forward kernels: (x, or a contiguous copy where its rows are not regular, rows per group,
    group stride, row stride), row r at (r // group) * group stride + (r % group) * row stride. With unit feature
    stride, a [M, N] (a CLS token's rows) and a [B, S, N] (a slice of tokens ``x[:, first:]`` of the residual stream,
    the tokens a TORE cache holds) are read in place."""
    if x.dim() == 2 and x.stride(-1) == 1:
        return x, max(1, x.shape[0]), 0, x.stride(0)
    if x.dim() == 3 and x.stride(-1) == 1 and x.shape[1]:
        return x, x.shape[1], x.stride(0), x.stride(1)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return x2, max(1, x2.shape[0]), 0, x2.shape[1]


def residual_norm_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    b: torch.Tensor,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    ones: bool = False,
    *,
    tile: int = RESIDUAL_TILE,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z = x + (y + b) * gamma and, where ``weight`` is given, n = its layer norm, by one Triton pass: a pre-norm
    block's residual add (y a linear layer's product without its bias b; gamma timm's LayerScale) and the norm that
    reads the sum next. No autograd (:func:`avex.train.epilogue.train_residual_norm` adds it).

    Args:
        x: [..., N] (any strides; see :func:`_rows_in_place`). y: like x, contiguous or copied. b, gamma: [N].
        weight, bias: the norm's [N], or None: z alone.
        eps: added to the norm's variance.
        ones: n's rows stored each beside a column of ones (:data:`ONES_COLUMNS`; with a norm).
        tile, num_warps: launch settings (elements of a program's tile; warps).

    Returns:
        z [M, N] and n [M, N] (a view of rows N + ONES_COLUMNS apart with ``ones``) in y's dtype (n is z without a
        norm); fp32 mean and 1/std [M] (empty without a norm).
    """
    assert triton is not None
    n = y.shape[-1]
    x2, seq, stride_xb, stride_xs = _rows_in_place(x)
    y2 = y.reshape(-1, n).contiguous()
    m = y2.shape[0]
    norm = weight is not None
    z = torch.empty_like(y2)
    pad = ONES_COLUMNS if ones and norm else 0
    out = y2.new_empty(m, n + pad)[:, :n] if norm else z
    mean = torch.empty(m if norm else 0, dtype=torch.float32, device=y.device)
    rstd = torch.empty_like(mean)
    block_n, block_m = _row_blocks(n, tile)
    if m:
        _residual_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
            x2, y2, b, b if gamma is None else gamma, b if weight is None else weight, b if bias is None else bias,
            z, out, mean, rstd, m, n, seq, stride_xb, stride_xs, out.stride(0), eps, BLOCK_M=block_m,
            BLOCK_N=block_n, GAMMA=gamma is not None, NORM=norm, ONES=pad, num_warps=num_warps,
        )  # fmt: skip
    return z, out, mean, rstd


def residual_norm(
    x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor | None, norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: a block's residual add, z = x + (y + b) * gamma, and ``norm(z)``, by
    :func:`residual_norm_forward`'s one pass; the caller checks that the kernel applies (:func:`norm_applies` of
    the norms, b and gamma in x's dtype). If the kernel fails to build or launch here, PyTorch's ops from then on,
    with one warning.

    Args:
        x: [B, S, N] the residual stream. y: [B, S, N] a linear layer's product without its bias b [N].
        gamma: [N] the layer scale, or None. norm: the LayerNorm that reads z next, or None (z is then returned twice).

    Returns:
        z and norm(z), each [B, S, N] in y's dtype (fp32 arithmetic, rounded once; the norm of the rounded z).
    """

    ln = cast(nn.LayerNorm | None, norm)  # the caller's norm_applies: a plain affine LayerNorm

    def kernel() -> tuple[torch.Tensor, torch.Tensor]:
        w = None if ln is None else ln.weight
        nb = None if ln is None else ln.bias
        eps = 0.0 if ln is None else float(ln.eps)
        z, n, _, _ = residual_norm_forward(x, y, b, gamma, w, nb, eps)
        return z.view(y.shape), n.view(y.shape)

    def fallback() -> tuple[torch.Tensor, torch.Tensor]:
        z = x + (y + b) if gamma is None else torch.addcmul(x, y + b, gamma)
        return z, z if norm is None else norm(z)

    return kernel_or_fallback(
        "residual norm",
        kernel,
        fallback,
        "residual adds and layer norms now use PyTorch's kernels, with the same results but slower. Fix the "
        "Triton install (it needs a C compiler at first use).",
    )


def _capturing(x: torch.Tensor) -> bool:
    """Whether x's kernels are being captured into a CUDA graph (replayed later without a launch from Python)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def launch_pays(x: torch.Tensor) -> bool:
    """Whether a Triton kernel over the rows of x [..., N] beats PyTorch's few small ops here: at least
    :data:`MIN_ROWS` rows, or a CUDA graph being captured (a replay launches nothing). Below that, from eager Python,
    a Triton launch costs more host time than the ops it replaces (see :data:`MIN_ROWS`)."""
    return x.numel() >= MIN_ROWS * x.shape[-1] or _capturing(x)


def norm_applies(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`norm_forward` takes the kernel for ``norm(x)`` (and a block may fuse its residual adds with
    ``norm``: :func:`residual_norm`): a plain affine LayerNorm over x's last axis, in x's dtype,
    enough rows, no autocast (which would make the module's output fp32), and a kernel that may run on x."""
    if type(norm) not in _NORMS or not _kernel_may_run(x) or x.dtype not in _DTYPES:
        return False
    ln = norm
    assert isinstance(ln, nn.LayerNorm)
    return (
        ln.weight is not None
        and ln.bias is not None
        and ln.weight.dtype == x.dtype == ln.bias.dtype
        and ln.normalized_shape == (x.shape[-1],)
        and x.shape[-1] <= MAX_FEATURES
        and launch_pays(x)
        and not getattr(ln, "_fast_norm", False)  # timm's apex / fp32 variant: not F.layer_norm
        and not torch.is_autocast_enabled(x.device.type)
    )


def norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``, by :func:`layer_norm` where it applies: a ``torch.nn.LayerNorm`` or timm's ``LayerNorm``
    (affine, over the last axis, in x's dtype), x on CUDA (or Triton's interpreter) with autograd off and at
    least :data:`MIN_ROWS` rows (any number while a CUDA graph is captured) of at most :data:`MAX_FEATURES`;
    anything else (CPU, training, other norms) runs the module itself. If the kernel fails to build or launch here,
    the module from then on, with one warning.

    Args:
        norm: the norm module (a ViT block's ``norm1`` / ``norm2``, the final ``norm``, the decoder's).
        x: [..., N].

    Returns:
        norm(x): [..., N] in x's dtype (fp32 statistics; within rounding of PyTorch's kernel, not bit-equal).
    """
    if not norm_applies(norm, x):
        return norm(x)
    ln = norm
    assert isinstance(ln, nn.LayerNorm) and ln.weight is not None and ln.bias is not None
    weight, bias = ln.weight, ln.bias
    return kernel_or_fallback(
        "layer norm",
        lambda: layer_norm(x, weight, bias, ln.eps),
        lambda: norm(x),
        "layer norms now use PyTorch's kernel, with the same results but slower. Fix the Triton install (it "
        "needs a C compiler at first use).",
    )
