"""The fused step's residual-and-norm kernels (avex/train/epilogue.py) against PyTorch's own ops, and the step built
on them.

Each op's outputs and every gradient are checked against the plain PyTorch composition it replaces, run by
PyTorch's autograd (``x + (y + b) * gamma`` then ``F.layer_norm``): in fp32 under Triton's interpreter (the
kernels, ``TRITON_INTERPRET=1`` in a fresh process as tests/test_layer_norm.py does), in bf16 there and on CUDA
against an fp32 reference, and on the CPU without the interpreter (PyTorch's ops in the kernels' place). Widths:
192 and 128 (the ViT's and the decoder's) and 48 (not a power of two); row counts that fill no whole program of
128 rows. Then the whole fused step with the kernels equals the
eager objective, with and without layer scale.

The norms' outputs stored beside a column of ones (``ones=True``) feed ``train_linear(..., ones=True)``, whose bias
gradient is then that column of its weight gradient's product: checked the same way against ``F.layer_norm`` and
``F.linear``, with a stored column of 2s in place of the ones failing the check.

fp32 tolerances: outputs 1e-5 relative / 2e-5 absolute (the summation order differs), gradients the same plus
1e-6 of the largest entry (a column sum over hundreds of rows is far larger than one element).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from script_kit import interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# [rows] of the residual stream per case: one row; a slice of tokens x[:, 2:] of [3, 9, D] (rows read at a stride,
# 21 of them); 300 rows, whose last program of 128 is partial.
SHAPES = ((1, 1), (3, 9), (2, 150))


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """got within ``tol`` relative and ``2 * tol`` absolute of want (fp32 of both), plus ``tol / 10`` of want's
    largest entry; shapes equal."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    atol = 2 * tol + tol / 10 * float(want.detach().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def _close_grads(
    names: tuple[str, ...], leaves: list[torch.Tensor], refs: list[torch.Tensor], tol: float, case: str
) -> None:
    """Each leaf's gradient :func:`_close` to its reference's; a leaf whose reference got none must get none."""
    for name, leaf, ref in zip(names, leaves, refs):
        if ref.grad is None:
            assert leaf.grad is None, (case, name)
        else:
            _close(leaf.grad, ref.grad, tol, f"{case} d{name}")


def _residual_case(
    device: str, dtype: torch.dtype, d: int, rows: tuple[int, int], scaled: bool, with_dz: bool, norm: bool, tol: float
) -> bool:
    """One call of train_residual_norm (``norm``) or train_residual against the PyTorch composition in fp32 (on the
    inputs rounded to ``dtype``), outputs and every gradient; with gamma or without, with z's own gradient or
    without (None: as after the last block). Returns whether the call took the Triton kernels."""
    from avex.train.epilogue import train_residual, train_residual_norm

    gen = torch.Generator(device=device).manual_seed(d + rows[1])
    b_, s = rows
    first = 2 if s > 2 else 0  # keys-only rows: the residual is x[:, first:] (rows at a stride)
    x = torch.randn(b_, s, d, generator=gen, device=device) * 2 + 0.5
    y = torch.randn(b_, s - first, d, generator=gen, device=device)
    vecs = [torch.randn(d, generator=gen, device=device) for _ in range(4)]  # b, gamma, the norm's weight and bias
    leaves = [t.to(dtype).requires_grad_() for t in (x, y, *vecs)]
    refs = [t.detach().float().requires_grad_() for t in leaves]
    xa, ya, ba, ga, wa, nba = leaves
    xr, yr, br, gr, wr, nbr = refs
    zr = xr[:, first:] + (yr + br) * gr if scaled else xr[:, first:] + (yr + br)
    if norm:
        got = list(train_residual_norm(xa[:, first:], ya, ba, ga if scaled else None, wa, nba, 1e-6))
        want = [zr, F.layer_norm(zr, (d,), wr, nbr, 1e-6)]
    else:
        got, want = [train_residual(xa[:, first:], ya, ba, ga if scaled else None)], [zr]
    case = f"D={d} rows={b_}x{s - first} gamma={scaled} dz={with_dz} norm={norm}"
    for name, out, ref in zip(("z", "n"), got, want):
        assert out.dtype == dtype
        _close(out, ref, tol, f"{case} {name}")
    grads = [torch.randn(zr.shape, generator=gen, device=device) for _ in want]
    read = slice(0, None) if with_dz else slice(1, None)  # without dz only n is read: z's gradient None in the op
    torch.autograd.backward(got[read], [g.to(dtype) for g in grads[read]])
    torch.autograd.backward(want[read], grads[read])
    # no reference gradient: gamma off; the norm's weight and bias without a norm
    _close_grads(("x", "y", "b", "gamma", "weight", "bias"), leaves, refs, tol, case)
    return type(got[0].grad_fn).__name__ in ("_ResidualNormBackward", "_ResidualBackward")


def check_residual_norm(
    device: str, dtype: torch.dtype, widths: tuple[int, ...], shapes: tuple[tuple[int, int], ...], tol: float
) -> int:
    """:func:`_residual_case` for every width, shape, gamma on and off and (norm without dz, norm and residual
    alone with dz): 6 calls per width and shape. Returns how many took the Triton kernels."""
    calls = ((False, True), (True, True), (True, False))  # (with_dz, norm)
    return sum(
        _residual_case(device, dtype, d, rows, scaled, with_dz, norm, tol)
        for d in widths
        for rows in shapes
        for scaled in (False, True)
        for with_dz, norm in calls
    )


def ones_case(
    device: str, dtype: torch.dtype, d: int, rows: tuple[int, int], residual: bool, tol: float, tamper: bool = False
) -> bool:
    """A norm asked for ``ones=True`` (train_residual_norm, or train_layer_norm) into ``train_linear(..., ones=True)``,
    the linear layer's output and every gradient against a reference, the stored columns a 1 then zeros where the
    kernels ran. The reference: in fp32, ``F.layer_norm`` then ``F.linear``; in a lower dtype, the same ops without
    the ones column on the same inputs (a product over hundreds of rows of bf16 gradients is itself far from fp32; the
    ones column must not move it). ``tamper``: the stored 1s made 2s before the linear layer reads them (the bias
    gradient then doubles). Returns whether the ones column was used."""
    from avex.layer_norm import ONES_COLUMNS
    from avex.train.epilogue import train_residual_norm
    from avex.train.rows import ones_rows, train_layer_norm, train_linear

    def norm_linear(
        x: torch.Tensor,
        y: torch.Tensor,
        b: torch.Tensor,
        w: torch.Tensor,
        nb: torch.Tensor,
        lw: torch.Tensor,
        lb: torch.Tensor,
        ones: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if dtype == torch.float32 and not ones:
            z = x + (y + b) if residual else x
            return F.linear(F.layer_norm(z, (d,), w, nb, 1e-6), lw, lb), None
        if residual:
            n = train_residual_norm(x, y, b, None, w, nb, 1e-6, ones=ones)[1]
        else:
            n = train_layer_norm(x, w, nb, 1e-6, ones=ones)
        stored = ones_rows(n) if ones else None
        if stored is not None and tamper:  # through a tensor of its own on the same memory: autograd does not see it
            raw = n.new_empty(0).set_(n.untyped_storage(), stored.storage_offset(), stored.shape, stored.stride())
            raw[:, d] = 2
        return train_linear(n, lw, lb, ones=ones), stored

    gen = torch.Generator(device=device).manual_seed(d + rows[1] + residual)
    x = torch.randn(*rows, d, generator=gen, device=device) * 2 + 0.5
    y = torch.randn(*rows, d, generator=gen, device=device)
    vecs = [torch.randn(d, generator=gen, device=device) for _ in range(3)]  # b, the norm's weight and bias
    lw = torch.randn(3 * d, d, generator=gen, device=device) / d**0.5
    lb = torch.randn(3 * d, generator=gen, device=device)
    leaves = [t.to(dtype).requires_grad_() for t in (x, y, *vecs, lw, lb)]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    got, stored = norm_linear(*leaves, ones=True)
    if stored is not None and not tamper:
        assert torch.equal(stored[:, d], torch.ones_like(stored[:, d])), "the stored column is not all ones"
        assert not stored[:, d + 1 : d + ONES_COLUMNS].any(), "the stored columns after the ones are not zeros"
    want = norm_linear(*refs, ones=False)[0]
    case = f"D={d} rows={rows} residual={residual}"
    _close(got, want, tol, f"{case} out")
    grad = torch.randn(want.shape, generator=gen, device=device).to(dtype)
    got.backward(grad)
    want.backward(grad)
    # no reference gradient: y and b without the residual add
    _close_grads(("x", "y", "b", "weight", "bias", "linear weight", "linear bias"), leaves, refs, tol, case)
    return stored is not None and type(got.grad_fn).__name__ == "_LinearBackward"


def check_ones(
    device: str, dtype: torch.dtype, widths: tuple[int, ...], shapes: tuple[tuple[int, int], ...], tol: float
) -> int:
    """:func:`ones_case` for every width and shape, after a residual add's norm and a plain norm. Returns how many
    used the ones column."""
    return sum(ones_case(device, dtype, d, rows, res, tol) for d in widths for rows in shapes for res in (True, False))


# ------------------------------------------------------------------------------ the kernels (interpreter)
@needs_triton
def test_residual_norm_kernels_match_pytorch_under_interpreter() -> None:
    """fp32: every case takes the kernels and equals PyTorch's composition; bf16: within bf16 rounding of fp32.
    The check fails on a backward that swaps the norm's weight and bias gradients."""
    out = interpreted("""
        import torch
        from tests.test_train_fused_norm import SHAPES, check_residual_norm
        per_width = len(SHAPES) * 2 * 3  # shapes x gamma x (norm without dz, norm and residual alone with dz)
        assert check_residual_norm("cpu", torch.float32, (192, 128, 48), SHAPES, 1e-5) == 3 * per_width
        assert check_residual_norm("cpu", torch.bfloat16, (192,), ((2, 150),), 2e-2) == 6
        import avex.train.rows as R
        default = R.ROW_LAUNCH["residual_norm_backward"]
        for stages in (1, 2):  # the backward's loads at use, and one tile ahead; 300 rows: three programs of 128
            R.ROW_LAUNCH["residual_norm_backward"] = default._replace(rows=128, stages=stages)
            assert check_residual_norm("cpu", torch.float32, (48,), ((2, 150),), 1e-5) == 6
        R.ROW_LAUNCH["residual_norm_backward"] = default
        import avex.train.epilogue as E
        split = E._split
        E._split = lambda *a: (lambda s: (*s[:2], *s[2:][::-1]))(split(*a))  # the norm's two gradients swapped
        try:
            check_residual_norm("cpu", torch.float32, (48,), ((1, 1),), 1e-5)
        except AssertionError as err:
            assert "dweight" in str(err), err
        else:
            raise AssertionError("the check missed swapped gradients")
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_triton
def test_bias_gradient_from_the_ones_column_under_interpreter() -> None:
    """fp32: every case stores the ones column and takes the bias gradient from it, equal to PyTorch's composition; a
    column of 2s doubles the bias gradient, and the check fails on it, naming the bias."""
    out = interpreted("""
        import torch
        from tests.test_train_fused_norm import SHAPES, check_ones, ones_case
        assert check_ones("cpu", torch.float32, (192, 128, 48), SHAPES, 1e-5) == 3 * len(SHAPES) * 2
        assert check_ones("cpu", torch.bfloat16, (192,), ((2, 150),), 1e-2) == 2
        try:
            ones_case("cpu", torch.float32, 48, (2, 150), True, 1e-5, tamper=True)
        except AssertionError as err:
            assert "dlinear bias" in str(err), err
        else:
            raise AssertionError("the check missed a bias gradient read from a column of 2s")
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_triton
def test_fused_step_with_the_kernels_equals_eager_under_interpreter() -> None:
    """The whole fused step with every Triton kernel (attention, layer norms, the epilogues) against the eager
    objective at every K, with the fp32 tolerances of tests/test_train_step.py: a plain ViT with two decoder
    blocks (the decoder's last block queries the unseen rows only) and a DeiT-III (layer scale on both
    branches)."""
    out = interpreted("""
        import torch
        from fused_kit import fused_equals_eager, random_batch
        from test_train_fused_ls import _deit3
        from train_kit import tiny_tore
        from avex.train import kernels, rows
        found = set()  # the widths of the linear layers' inputs stored beside the ones column
        ones_rows = rows.ones_rows
        def counting(x):
            stored = ones_rows(x)
            if stored is not None:
                found.add(x.shape[-1])
            return stored
        rows.ones_rows = counting
        torch.manual_seed(0)
        for model in (tiny_tore(decoder_depth=2), _deit3()):
            assert len(list(fused_equals_eager(model, random_batch(model, 4, 3), 0.1))) == model.depth + 1
        assert kernels._WORKING[("residual norm", "cpu", torch.float32)]
        assert kernels._WORKING[("glimpse rows", "cpu", torch.float32)]  # the iterator's input as one product
        assert kernels._WORKING[("aggregator input", "cpu", torch.float32)]
        assert kernels._WORKING[("masked pixel mse", "cpu", torch.float32)]
        assert found == {32, 128}, found  # the ViTs' linear layers (width 32) and the decoders' (128) read the column
        print("ok")
    """)
    assert out.strip() == "ok"


def test_ones_rows_reads_only_the_layout_a_norm_stores() -> None:
    from avex.layer_norm import ONES_COLUMNS
    from avex.train.rows import ones_rows

    d = 12
    buf = torch.arange(6 * (d + ONES_COLUMNS), dtype=torch.float32).view(6, d + ONES_COLUMNS)
    x = buf[:, :d].view(2, 3, d)  # rows d + ONES_COLUMNS apart, as a norm with ones=True stores them
    got = ones_rows(x)
    assert got is not None and torch.equal(got, buf)
    assert ones_rows(x[:, 0]) is None  # every third row: not the layout
    assert ones_rows(torch.zeros(2, 3, d)) is None  # contiguous rows
    assert ones_rows(torch.zeros(1, 1, d)) is None  # one row passes any stride check, but has no columns beside it
    assert ones_rows(buf[:1, :d]) is not None  # one row with its columns


# ------------------------------------------------------------------------------ PyTorch's ops in their place
def test_without_triton_the_ops_are_pytorch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU without the interpreter no call takes a kernel, and the results are the same."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert check_residual_norm("cpu", torch.float32, (192, 48), SHAPES, 1e-5) == 0
    assert check_ones("cpu", torch.float32, (192, 48), SHAPES, 1e-5) == 0  # ones=True: plain outputs, same results


# ------------------------------------------------------------------------------ CUDA
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_epilogue_kernels_match_pytorch_on_cuda(dtype: torch.dtype) -> None:
    """The compiled kernels at the step's sizes (~100k rows of 192, the residual stream), bf16 within its rounding of
    fp32 (2e-2 of each tensor's largest entry, as the layer norm's CUDA test)."""
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert check_residual_norm("cuda", dtype, (192, 128), ((1000, 98), (37, 5)), tol) == 2 * 2 * 6
    assert check_ones("cuda", dtype, (192, 128), ((1000, 98), (37, 5)), tol / 2) == 2 * 2 * 2
