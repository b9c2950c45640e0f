"""Training's passes after a matrix product, each fused with the next pass over the same rows.

A pre-norm block ends each branch with a residual add, ``z = x + (y + b) * gamma`` (y a linear layer's product
without its bias b; gamma timm's LayerScale, where the block has one), and the next to read z is a layer norm:
the block's second, the next block's first, or the final norm. As PyTorch ops that is, forward, the add and the
norm (which reads z again); backward, the norm's backward, the sum of z's two gradients (the norm's and the
residual stream's), and a column sum for the bias (and another pass and sum for gamma): separate passes over
the same ~100k rows. :func:`train_residual_norm` does the forward in one pass and the whole backward in
another, its column sums kept per program in fp32 and summed once; :func:`train_residual` is the add alone
(the iterator's last block, whose sum is averaged before any norm). The norm's output may be stored beside a column of
ones (``ones=True``), for the linear layer that reads it to take its bias gradient from its weight gradient's product
(:func:`avex.train.rows.train_linear`). Where Triton cannot run they are PyTorch's ops under autograd.

The MLP's bias and GELU stay with cuBLAS and PyTorch: a Triton pass for gelu(y + b) forward and one for its
backward with the bias's column sums took 0.94 and 1.68 ms per step on an H200, against 0.69 and 0.93 for
PyTorch's GELU kernels with the bias in cuBLAS's epilogue; the GELU inside Triton matrix products (fc1's forward,
the backward's product through fc2) slowed the step by 2-4%; a forward that writes the slope beside h, leaving the
backward one multiply, was 1.04x PyTorch's pair alone: those passes are bound by memory (benchmarks/RESULTS.md 7.1).

Shapes: M rows, N features (D, the residual width).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from avex.kernel_fallback import _device_may_run, sm_count, triton
from avex.layer_norm import MAX_FEATURES, residual_norm_forward
from avex.train.kernels import _works
from avex.train.rows import ROW_LAUNCH, column_sum, row_blocks, sum_partials

if triton is not None:
    import triton.language as tl

    from avex.train.rows import _norm_input_grad

__all__ = ["train_residual", "train_residual_norm"]

if triton is not None:

    @triton.jit
    def _residual_bwd_loads(
        z_ptr,
        dn_ptr,
        dz_ptr,
        mean_ptr,
        rstd_ptr,
        y_ptr,
        tile,
        row_end,
        N,
        cols,
        in_cols,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GAMMA: tl.constexpr,
        NORM: tl.constexpr,
        DZ: tl.constexpr,
    ):
        """The loads of one tile of _residual_norm_bwd_kernel, in the tensors' dtypes (rows at or past row_end
        masked): (rows, dz, z, dn, mean, rstd, y), zeros for what the flags leave out."""
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        in_rows = rows < row_end
        mask = in_rows[:, None] & in_cols[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dz = tl.zeros([BLOCK_M, BLOCK_N], dtype=z_ptr.dtype.element_ty)
        z = tl.zeros([BLOCK_M, BLOCK_N], dtype=z_ptr.dtype.element_ty)
        dn = tl.zeros([BLOCK_M, BLOCK_N], dtype=z_ptr.dtype.element_ty)
        y = tl.zeros([BLOCK_M, BLOCK_N], dtype=z_ptr.dtype.element_ty)
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if DZ:
            dz = tl.load(dz_ptr + offs, mask=mask, other=0.0)
        if NORM:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0)
            dn = tl.load(dn_ptr + offs, mask=mask, other=0.0)
            mean = tl.load(mean_ptr + rows, mask=in_rows, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=in_rows, other=0.0)
        if GAMMA:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        return rows, dz, z, dn, mean, rstd, y

    @triton.jit
    def _residual_norm_bwd_kernel(
        z_ptr,
        dn_ptr,
        dz_ptr,
        w_ptr,
        mean_ptr,
        rstd_ptr,
        y_ptr,
        b_ptr,
        g_ptr,
        dx_ptr,
        dy_ptr,
        partial_ptr,
        M,
        N,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CHUNKS: tl.constexpr,
        SLOTS: tl.constexpr,
        GAMMA: tl.constexpr,
        NORM: tl.constexpr,
        DZ: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        # Rows as _layer_norm_bwd_kernel takes them (CHUNKS tiles of BLOCK_M rows per program). dx = dz (zero where
        # not DZ) + the norm's input gradient (NORM), written where NORM (else dx is dz itself); dy = dx * gamma,
        # written where GAMMA. Per tile element fp32 sums, summed over the tile's rows once at the end into
        # partial[p, slot, :]: slot 0 dy (the bias gradient); 1 and 2 dn * zhat and dn (the norm's weight and
        # bias, where NORM); the last dx * (y + b) (gamma's, where GAMMA). PREFETCH: the next tile's loads are
        # issued before this tile's arithmetic, so that a warp has two tiles' loads in flight.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        in_cols = cols < N
        w = tl.load(w_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)  # (a stand-in [N] where absent)
        b = tl.load(b_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
        acc_db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_dnb = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_dg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        row_end = tl.minimum(M, (pid + 1) * CHUNKS * BLOCK_M)
        if PREFETCH:
            n_rows, n_dz, n_z, n_dn, n_mean, n_rstd, n_y = _residual_bwd_loads(
                z_ptr, dn_ptr, dz_ptr, mean_ptr, rstd_ptr, y_ptr, pid * CHUNKS, row_end, N, cols, in_cols,
                BLOCK_M, BLOCK_N, GAMMA, NORM, DZ,
            )  # fmt: skip
        # A loop, not unrolled: unrolled (tl.static_range, like rows.py's kernels with their fewer loads), ptxas kept
        # later tiles' loads in registers and spilled.
        for i in range(CHUNKS):
            if PREFETCH:
                rows, t_dz, t_z, t_dn, mean, rstd, t_y = n_rows, n_dz, n_z, n_dn, n_mean, n_rstd, n_y
                n_rows, n_dz, n_z, n_dn, n_mean, n_rstd, n_y = _residual_bwd_loads(
                    z_ptr, dn_ptr, dz_ptr, mean_ptr, rstd_ptr, y_ptr, pid * CHUNKS + i + 1, row_end, N, cols,
                    in_cols, BLOCK_M, BLOCK_N, GAMMA, NORM, DZ,
                )  # fmt: skip
            else:
                rows, t_dz, t_z, t_dn, mean, rstd, t_y = _residual_bwd_loads(
                    z_ptr, dn_ptr, dz_ptr, mean_ptr, rstd_ptr, y_ptr, pid * CHUNKS + i, row_end, N, cols, in_cols,
                    BLOCK_M, BLOCK_N, GAMMA, NORM, DZ,
                )  # fmt: skip
            mask = (rows < row_end)[:, None] & in_cols[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            dx = t_dz.to(tl.float32)
            if NORM:
                dn = t_dn.to(tl.float32)
                dx_norm, zhat = _norm_input_grad(t_z.to(tl.float32), dn, w, mean, rstd, mask, N)
                dx += dx_norm
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                acc_dw += dn * zhat
                acc_dnb += dn
            if GAMMA:
                y = t_y.to(tl.float32) + b[None, :]
                acc_dg += dx * y
                dy = dx * g[None, :]
                tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
                acc_db += dy
            else:
                acc_db += dx
        out = partial_ptr + pid * SLOTS * N + cols
        tl.store(out, tl.sum(acc_db, axis=0), mask=in_cols)
        if NORM:
            tl.store(out + N, tl.sum(acc_dw, axis=0), mask=in_cols)
            tl.store(out + 2 * N, tl.sum(acc_dnb, axis=0), mask=in_cols)
        if GAMMA:
            tl.store(out + (SLOTS - 1) * N, tl.sum(acc_dg, axis=0), mask=in_cols)


# ------------------------------------------------------------------------------ launches (no autograd)
def _residual_norm_backward(
    z: torch.Tensor,
    dn: torch.Tensor | None,
    dz: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
    y: torch.Tensor | None,
    b: torch.Tensor,
    gamma: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`~avex.layer_norm.residual_norm_forward` by one Triton pass and one sum of
    per-program partials.

    Args:
        z: [M, N] the forward's. dn: n's gradient (with a norm: ``weight`` given). dz: z's own, or None (zeros).
            Where there is no norm, dz must be given.
        mean, rstd: the forward's (with a norm). y: [M, N] (with gamma; else None). b, gamma: [N].

    Returns:
        dx and dy [M, N] (the same tensor without gamma); the column sums [slots, N] in z's dtype: the bias
        gradient, then the norm's weight and bias gradients (with a norm), then gamma's (with gamma).
    """
    assert triton is not None
    m, n = z.shape
    norm, scaled = weight is not None, gamma is not None
    dz2 = None if dz is None else dz.reshape(m, n).contiguous()
    if not norm:
        assert dz2 is not None
        if not scaled:  # dx = dy = dz: only the bias gradient to sum
            return dz2, dz2, column_sum(dz2)[None]
    dn2 = None if dn is None else dn.reshape(m, n).contiguous()
    dx = torch.empty_like(z) if norm else dz2
    assert dx is not None
    dy = torch.empty_like(z) if scaled else dx
    slots = 1 + 2 * norm + scaled
    block_n, block_m, chunks, programs, warps = row_blocks("residual_norm_backward", m, n, sm_count(z.device))
    partial = torch.empty(programs, slots, n, dtype=torch.float32, device=z.device)
    if programs:
        _residual_norm_bwd_kernel[(programs,)](
            z, z if dn2 is None else dn2, z if dz2 is None else dz2, b if weight is None else weight,
            z if mean is None else mean, z if rstd is None else rstd,
            z if y is None else y.reshape(m, n).contiguous(), b, b if gamma is None else gamma,
            dx, dy, partial, m, n, BLOCK_M=block_m, BLOCK_N=block_n, CHUNKS=chunks, SLOTS=slots,
            GAMMA=scaled, NORM=norm, DZ=dz2 is not None, PREFETCH=ROW_LAUNCH["residual_norm_backward"].stages > 1,
            num_warps=warps,
        )  # fmt: skip
    return dx, dy, sum_partials(partial, z.dtype)  # fp32 sums, rounded once


def _split(sums: torch.Tensor, norm: bool, scaled: bool) -> tuple[torch.Tensor | None, ...]:
    """:func:`_residual_norm_backward`'s column sums as (db, dgamma or None, dweight, dbias) (the last two with a
    norm)."""
    dgamma = sums[-1] if scaled else None
    return (sums[0], dgamma, sums[1], sums[2]) if norm else (sums[0], dgamma)


# ------------------------------------------------------------------------------ under autograd
class _ResidualNorm(torch.autograd.Function):
    """:func:`train_residual_norm` by the Triton kernels; saves z, not x (and y only for gamma's gradient)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        b: torch.Tensor,
        gamma: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
        ones: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        launch = ROW_LAUNCH["residual_norm_forward"]  # the forward shared with inference, at the training's launch
        z, n, mean, rstd = residual_norm_forward(
            x, y, b, gamma, weight, bias, eps, ones, tile=launch.tile, num_warps=launch.num_warps
        )
        ctx.set_materialize_grads(False)  # dz None where nothing reads z again (the final norm's): no zeros made
        ctx.save_for_backward(z, None if gamma is None else y, b, gamma, weight, mean, rstd)
        ctx.x_shape = x.shape
        return z.view(y.shape), n.view(y.shape)

    @staticmethod
    def backward(ctx: Any, dz: torch.Tensor | None, dn: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        z, y, b, gamma, weight, mean, rstd = ctx.saved_tensors
        if dn is None:  # never in the step (every norm feeds a linear layer)
            dn = torch.zeros_like(z)
        dx, dy, sums = _residual_norm_backward(z, dn, dz, weight, mean, rstd, y, b, gamma)
        db, dgamma, dweight, dbias = _split(sums, True, gamma is not None)
        return dx.view(ctx.x_shape), dy.view(ctx.x_shape), db, dgamma, dweight, dbias, None, None


class _Residual(torch.autograd.Function):
    """:func:`train_residual` by the Triton kernels (the bias gradient by :func:`column_sum` without gamma)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor | None
    ) -> torch.Tensor:
        launch = ROW_LAUNCH["residual_norm_forward"]
        z = residual_norm_forward(x, y, b, gamma, None, None, 0.0, tile=launch.tile, num_warps=launch.num_warps)[0]
        ctx.save_for_backward(z, None if gamma is None else y, b, gamma)
        ctx.x_shape = x.shape
        return z.view(y.shape)

    @staticmethod
    def backward(ctx: Any, dz: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, y, b, gamma = ctx.saved_tensors
        dx, dy, sums = _residual_norm_backward(z, None, dz, None, None, None, y, b, gamma)
        db, dgamma = _split(sums, False, gamma is not None)
        return dx.view(ctx.x_shape), dy.view(ctx.x_shape), db, dgamma


# ------------------------------------------------------------------------------ the functions the step calls
def _kernels_take(name: str, y: torch.Tensor, params: list[torch.Tensor | None], trial: Any) -> bool:
    """Whether the ``name`` kernels compute this call: Triton on CUDA (or its interpreter), rows of at most
    :data:`~avex.layer_norm.MAX_FEATURES` (one row to a program's tile), one dtype, and the kernels built here."""
    if not _device_may_run(y) or y.shape[-1] > MAX_FEATURES:
        return False
    return all(p is None or p.dtype == y.dtype for p in params) and _works(name, y, trial)


def train_residual_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    b: torch.Tensor,
    gamma: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    ones: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A branch's residual add and the layer norm that reads it next, with autograd; one Triton pass each way on
    CUDA (or Triton's interpreter), PyTorch's ops elsewhere.

    Backward takes z's own gradient (none where nothing reads z again, as after the last block) and n's, and
    gives every gradient from one pass over the rows: x's (z's and the norm's summed), y's, and the column sums
    of b, gamma and the norm's weight and bias in fp32 per program, summed once.

    Args:
        x: [..., N] the residual stream (rows at any strides; a slice of tokens ``x[:, first:]`` is read in place).
        y: like x, a linear layer's output without its bias.
        b: [N] that bias. gamma: [N] the layer scale (timm's LayerScale), or None.
        weight, bias, eps: the layer norm's ([N], [N]; added to the variance).
        ones: where the kernels run, n is stored beside a column of ones, for a linear layer to read with
            :func:`~avex.train.rows.train_linear`'s ``ones=True`` (see :data:`~avex.layer_norm.ONES_COLUMNS`).

    Returns:
        z = x + (y + b) * gamma and n = layer_norm(z), both shaped as y, in y's dtype (fp32 arithmetic, rounded
        once; n is the norm of the rounded z).
    """
    if _kernels_take("residual norm", y, [x, b, gamma, weight, bias], _residual_norm_trial):
        z, n = _ResidualNorm.apply(x, y, b, gamma, weight, bias, eps, ones)
        return z, n
    z = _residual_torch(x, y, b, gamma)
    return z, F.layer_norm(z, (z.shape[-1],), weight, bias, eps)


def train_residual(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """z = x + (y + b) * gamma (gamma None: x + y + b) with autograd, as :func:`train_residual_norm` without the
    norm: where the sum is read before any norm.

    Args and shapes as :func:`train_residual_norm`'s; returns z shaped as y.
    """
    if _kernels_take("residual norm", y, [x, b, gamma], _residual_norm_trial):
        z: torch.Tensor = _Residual.apply(x, y, b, gamma)
        return z
    return _residual_torch(x, y, b, gamma)


def _residual_torch(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return x + (y + b) if gamma is None else torch.addcmul(x, y + b, gamma)


def _residual_norm_trial(x: torch.Tensor) -> torch.Tensor:
    w = torch.ones(48, device=x.device, dtype=x.dtype, requires_grad=True)
    z, n = _ResidualNorm.apply(x, x * 2, w, w, w, torch.zeros_like(w), 1e-6, False)
    return z + n + _Residual.apply(x, x * 2, w, w)
