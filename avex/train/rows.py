"""Training kernels over many short rows: layer norm forward and backward, bias gradients.

A training step normalises and projects ~100k rows of 128 or 192 features. PyTorch's layer norm forward takes
one row per block (its fixed cost per row, not the bandwidth, sets the pace), and its backward computes the
weight and bias gradients in a separate kernel that spreads the reduction over the rows across few blocks (an
eighth of the memory bandwidth on an H200); its bias gradient of a linear layer is a column reduction at a
third of the bandwidth. Here every program takes many rows: :func:`avex.layer_norm.layer_norm_forward` (shared
with inference), one backward pass that gives the input gradient and per-program partial sums of the weight and
bias gradients (:func:`layer_norm_backward`), and :func:`column_sum` for bias gradients (their per-program
partials summed by :func:`sum_partials`); :func:`train_layer_norm`, :func:`train_linear` and :func:`train_add_row` put
them under autograd, with PyTorch's ops where Triton cannot run. A linear layer whose input a norm stored beside a
column of ones (:func:`ones_rows`) needs no column sum: its bias gradient is one more column of ``[x, 1]^T dy``.

Shapes: M rows, N features.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from avex.kernel_fallback import _device_may_run, sm_count, triton
from avex.layer_norm import _ROWS, ONES_COLUMNS, RESIDUAL_TILE, _row_blocks, layer_norm_forward
from avex.train.kernels import _works

if triton is not None:
    import triton.language as tl

__all__ = [
    "ROW_LAUNCH",
    "RowLaunch",
    "column_sum",
    "layer_norm_backward",
    "ones_rows",
    "row_blocks",
    "sum_partials",
    "train_add_row",
    "train_layer_norm",
    "train_linear",
]


if triton is not None:

    @triton.jit
    def _norm_input_grad(x, dy, w, mean, rstd, mask, N):
        """A layer norm's input gradient for an fp32 tile: x and the output's gradient dy [BLOCK_M, BLOCK_N], the
        weight w [BLOCK_N] in fp32, each row's mean and 1/std. Returns (dx, xhat), xhat 0 at masked elements.
        Shared with the fused residual norm's backward (avex.train.epilogue)."""
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        return (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], xhat

    @triton.jit
    def _layer_norm_bwd_kernel(
        x_ptr,
        dy_ptr,
        w_ptr,
        mean_ptr,
        rstd_ptr,
        dx_ptr,
        partial_ptr,
        M,
        N,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CHUNKS: tl.constexpr,
    ):
        # Program p takes rows [p * CHUNKS * BLOCK_M, (p + 1) * CHUNKS * BLOCK_M) of the contiguous [M, N] tensors,
        # BLOCK_M at a time (a row per warp lane group: its sums stay inside a warp), and keeps its own fp32 sums of
        # dy * xhat and dy per tile element, summed over the tile's rows once at the end into partial[p, 0 or 1, :].
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        in_cols = cols < N
        w = tl.load(w_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(CHUNKS):
            rows = (pid * CHUNKS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            in_rows = rows < M
            mask = in_rows[:, None] & in_cols[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=in_rows, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=in_rows, other=0.0)
            dx, xhat = _norm_input_grad(x, dy, w, mean, rstd, mask, N)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        tl.store(partial_ptr + pid * 2 * N + cols, tl.sum(dw, axis=0), mask=in_cols)
        tl.store(partial_ptr + pid * 2 * N + N + cols, tl.sum(db, axis=0), mask=in_cols)

    @triton.jit
    def _column_sum_kernel(
        x_ptr, partial_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr
    ):
        # partial[p, :] = fp32 sum of rows [p * CHUNKS * BLOCK_M, (p + 1) * CHUNKS * BLOCK_M) of x [M, N].
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        in_cols = cols < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # summed over its rows once, at the end
        for i in tl.static_range(CHUNKS):
            rows = (pid * CHUNKS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & in_cols[None, :]
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
            acc += x.to(tl.float32)
        tl.store(partial_ptr + pid * N + cols, tl.sum(acc, axis=0), mask=in_cols)

    @triton.jit
    def _sum_partials_kernel(
        partial_ptr, out_ptr, P, W, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, P_BLOCKS: tl.constexpr
    ):
        # out[w] = the fp32 sum over p of partial[p, w] (a fixed order: deterministic), rounded once to out's dtype.
        cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
        in_cols = cols < W
        acc = tl.zeros([BLOCK_P, BLOCK_W], dtype=tl.float32)
        for i in range(P_BLOCKS):
            rows = i * BLOCK_P + tl.arange(0, BLOCK_P)
            mask = (rows < P)[:, None] & in_cols[None, :]
            acc += tl.load(partial_ptr + rows.to(tl.int64)[:, None] * W + cols[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=in_cols)


# The second stage's tile (BLOCK_P partials x BLOCK_W columns): timed by benchmarks/rows_sweep.py.
SUM_LAUNCH = (256, 8)


class RowLaunch(NamedTuple):
    """Launch settings of a kernel over many short rows."""

    tile: int  # elements of a program's BLOCK_M x BLOCK_N tile (BLOCK_N: the width's power of two)
    num_warps: int
    rows: int  # rows per program of a pass that writes per-program partial sums (a power of two)
    stages: int = 1  # tiles whose loads a looping program keeps in flight (2: the next tile's issued early)


# By kernel (the residual norm's forward is in avex.layer_norm, shared with inference; its backward in
# avex.train.epilogue). The settings as first chosen (the residual norm's tiles so that ptxas spills no registers for
# sm_90 at widths 128 to 1024), then timed by benchmarks/rows_sweep.py
# (benchmarks/RESULTS.md 7.1): the first settings were the fastest but for the residual norm's backward, whose loads
# one tile ahead (stages 2) with tiles of 2,048 and 256 rows per program took it from 0.89 to 0.79 ms per step.
ROW_LAUNCH: dict[str, RowLaunch] = {
    "layer_norm_backward": RowLaunch(2048, 4, _ROWS),
    "column_sum": RowLaunch(4096, 4, _ROWS),
    "residual_norm_forward": RowLaunch(RESIDUAL_TILE, 4, _ROWS),  # one tile per program: rows unused
    "residual_norm_backward": RowLaunch(2048, 4, 256, 2),
}


# A pass with at most this many programs per multiprocessor takes fewer rows per program (never more than
# ROW_LAUNCH's), so that a few thousand rows spread over the GPU (0: ROW_LAUNCH's rows at every row count). 2 timed
# fastest of 0, 1 and 2 (benchmarks/gpu/train_setting.sh, RESULTS.md 7.1): 1.6% off the step at batch 512.
PROGRAMS_PER_SM = 2


def row_blocks(kernel: str, m: int, n: int, sms: int | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_M, CHUNKS, programs, num_warps) of ``kernel``'s pass over m rows of n features, by
    :data:`ROW_LAUNCH`: each program takes CHUNKS tiles of BLOCK_M consecutive rows (``rows`` rows in all).

    Given the GPU's ``sms`` multiprocessors (:func:`~avex.kernel_fallback.sm_count`; None under the interpreter),
    ``rows`` is halved (down to one tile) while the pass would still have at most :data:`PROGRAMS_PER_SM` programs
    per multiprocessor: at a few thousand rows (a small batch's short sequences) ROW_LAUNCH's rows leave most of
    the GPU idle, while passes over more rows keep them (more, shorter programs there pay more partial sums than
    they gain: benchmarks/RESULTS.md 7.1)."""
    if kernel not in ROW_LAUNCH:
        raise ValueError(f"row_blocks: kernel must be one of {sorted(ROW_LAUNCH)}, got {kernel!r}")
    launch = ROW_LAUNCH[kernel]
    block_n, block_m = _row_blocks(n, launch.tile)
    block_m = min(block_m, launch.rows)
    rows = launch.rows
    if sms:
        while rows > block_m and triton.cdiv(m, rows // 2) <= PROGRAMS_PER_SM * sms:
            rows //= 2
    return block_n, block_m, rows // block_m, triton.cdiv(m, rows), launch.num_warps


def sum_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partial [P, ...] fp32 (a first stage's per-program sums) summed over P in fp32 and rounded once to ``dtype``,
    in one launch (PyTorch's ``sum(0).to(dtype)`` takes two, the first about 10 us on an H200 however small)."""
    if partial.dtype != torch.float32 or partial.dim() < 1:
        raise ValueError(
            f"sum_partials: partial must be fp32 per-program sums [P, ...], got {partial.dtype} of shape "
            f"{tuple(partial.shape)}; pass partial.float() (the sums stay fp32 until the one rounding to dtype)"
        )
    partial = partial.contiguous()  # the kernel reads rows of W consecutive elements
    out = torch.empty(partial.shape[1:], dtype=dtype, device=partial.device)
    w = out.numel()
    block_p, block_w = SUM_LAUNCH
    p = partial.shape[0]
    grid = (triton.cdiv(w, block_w),)
    _sum_partials_kernel[grid](partial, out, p, w, BLOCK_P=block_p, BLOCK_W=block_w, P_BLOCKS=triton.cdiv(p, block_p))
    return out


def layer_norm_backward(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of a layer norm over the last axis, by one Triton pass over the rows.

    Args:
        x, dy: [..., N] the forward's input and the output's gradient (same dtype).
        weight: [N]. mean, rstd: fp32, one per row (:func:`layer_norm_forward`'s or ``torch.native_layer_norm``'s).

    Returns:
        dx like ``x``; dweight and dbias [N] in ``weight``'s dtype (summed over the rows in fp32).
    """
    if triton is None:
        raise RuntimeError("layer_norm_backward needs Triton (it ships with PyTorch's CUDA wheels)")
    n = x.shape[-1]
    x2, dy2 = x.reshape(-1, n).contiguous(), dy.reshape(-1, n).contiguous()
    m = x2.shape[0]
    block_n, block_m, chunks, programs, warps = row_blocks("layer_norm_backward", m, n, sm_count(x.device))
    dx = torch.empty_like(x2)
    partial = torch.empty(programs, 2, n, dtype=torch.float32, device=x.device)
    if programs:
        _layer_norm_bwd_kernel[(programs,)](
            x2, dy2, weight, mean.reshape(-1), rstd.reshape(-1), dx, partial, m, n,
            BLOCK_M=block_m, BLOCK_N=block_n, CHUNKS=chunks, num_warps=warps,
        )  # fmt: skip
    sums = sum_partials(partial, weight.dtype)  # fp32 sums, rounded once (sum's dtype= would round each partial)
    return dx.view(x.shape), sums[0], sums[1]


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """fp32 sums over the rows of a contiguous [M, N] tensor, in x's dtype: a bias gradient, in one Triton pass
    and a small second sum (PyTorch's own column reduction reads such tensors at a third of the bandwidth)."""
    m, n = x.shape
    block_n, block_m, chunks, programs, warps = row_blocks("column_sum", m, n, sm_count(x.device))
    partial = torch.empty(programs, n, dtype=torch.float32, device=x.device)
    if programs:
        _column_sum_kernel[(programs,)](
            x, partial, m, n, BLOCK_M=block_m, BLOCK_N=block_n, CHUNKS=chunks, num_warps=warps
        )
    return sum_partials(partial, x.dtype)  # fp32 sums, rounded once


class _Linear(torch.autograd.Function):
    """``F.linear`` with a bias; backward: two matrix products and :func:`column_sum` for the bias, or, where x's rows
    are stored beside a column of ones (:func:`ones_rows`), the bias gradient as that column of the weight
    gradient's product (dy is then read once, by the product)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ones: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.ones = ones
        if ones:  # x's rows lie N + ONES_COLUMNS apart: the product reads them in place
            return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], -1)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, None]:
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = (dy2 @ weight).view(x.shape) if ctx.needs_input_grad[0] else None  # pixels need none
        if ctx.ones:
            padded = ones_rows(x)
            assert padded is not None
            # [x, 1, 0 ...]^T dy: [N + ONES_COLUMNS, out]; its first N rows are dW^T, the next is the bias gradient.
            both = padded.t() @ dy2
            n = x.shape[-1]
            return dx, both[:n].t(), both[n], None
        dw = dy2.t() @ x.reshape(-1, x.shape[-1])
        return dx, dw, column_sum(dy2), None


def ones_rows(x: torch.Tensor) -> torch.Tensor | None:
    """[M, N + ONES_COLUMNS]: the rows of x [..., N] with the columns stored beside them, where x is laid out as a
    norm asked for ``ones=True`` stores its output (rows N + ONES_COLUMNS apart, in one block); else None.

    The layout alone is checked here; the values (a 1, then zeros) are the norm's contract, so only a caller that
    made x with ``ones=True`` should pass ``ones=True`` to :func:`train_linear`.
    """
    n = x.shape[-1]
    width = n + ONES_COLUMNS
    m = x.numel() // max(n, 1)
    if x.dim() < 2 or x.stride(-1) != 1 or m == 0:
        return None
    expected = width
    for size, stride in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    # A single row passes any stride check: its memory must also hold the columns beside it.
    if x.untyped_storage().nbytes() < (x.storage_offset() + m * width) * x.element_size():
        return None
    return x.as_strided((m, width), (width, 1))


class _AddRow(torch.autograd.Function):
    """``x + row``, the row broadcast over x's rows; backward: the row's gradient by :func:`column_sum`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        ctx.row_shape = row.shape
        return x + row

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dy, column_sum(dy.reshape(-1, dy.shape[-1]).contiguous()).view(ctx.row_shape)


def train_add_row(x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``x + row`` with autograd, x [..., N] and row [N] (or [1, .., 1, N]): a learned token added to many rows (the
    decoder's mask token), its gradient by :func:`column_sum` on CUDA (or Triton's interpreter), where PyTorch's
    broadcast backward would sum bf16 columns at a fraction of the bandwidth."""
    if _device_may_run(x) and x.dtype == row.dtype and row.shape[-1] == x.shape[-1] == row.numel():
        if _works("bias gradient", x, _linear_trial):
            return _AddRow.apply(x, row)
    return x + row


def train_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, ones: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with autograd; its bias gradient by :func:`column_sum` on CUDA (or Triton's
    interpreter).

    Args:
        x: [..., N]. weight: [out, N]. bias: [out].
        ones: x may come from a norm asked for ``ones=True`` (:func:`train_layer_norm`,
            :func:`~avex.train.epilogue.train_residual_norm`); where it is laid out so (:func:`ones_rows`), the bias
            gradient is one more column of the weight gradient's product, without :func:`column_sum`'s pass.
    """
    if _device_may_run(x) and x.dtype == weight.dtype == bias.dtype:
        if _works("bias gradient", x, _linear_trial):
            return _Linear.apply(x, weight, bias, ones and ones_rows(x) is not None)
    return F.linear(x, weight, bias)


class _LayerNorm(torch.autograd.Function):
    """:func:`layer_norm_forward` forward; :func:`layer_norm_backward` backward."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, ones: bool
    ) -> torch.Tensor:
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps, ones=ones)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        return (*layer_norm_backward(x, dy, weight, mean, rstd), None, None)


def train_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *, ones: bool = False
) -> torch.Tensor:
    """Layer norm over the last axis with autograd; the Triton backward on CUDA (or Triton's interpreter).

    ``ones``: where the kernels run, the output is stored beside a column of ones, for a linear layer to read with
    :func:`train_linear`'s ``ones=True`` (see :data:`~avex.layer_norm.ONES_COLUMNS`)."""
    if _device_may_run(x) and x.dtype == weight.dtype:
        if _works("layer norm", x, _layer_norm_trial):
            return _LayerNorm.apply(x, weight, bias, eps, ones)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_trial(x: torch.Tensor) -> torch.Tensor:
    w = torch.ones(48, device=x.device, dtype=x.dtype, requires_grad=True)
    return _LayerNorm.apply(x, w, torch.zeros_like(w), 1e-6, False)


def _linear_trial(x: torch.Tensor) -> torch.Tensor:
    w = torch.ones(8, 48, device=x.device, dtype=x.dtype, requires_grad=True)
    return _Linear.apply(x, w, torch.zeros(8, device=x.device, dtype=x.dtype, requires_grad=True), False)
