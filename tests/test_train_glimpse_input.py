"""The iterator's input as one product (avex/train/glimpse_input.py) against the PyTorch ops it replaces.

The Triton kernel's rows equal the PyTorch ops' (the 0s and 1s exactly, the pixels' normalisation, a multiply-add, to
one rounding) under Triton's interpreter and on CUDA; and
``rows @ weight^T`` with its gradients equals the old composition (gather, normalise, product, add of the position
rows, concatenation with the prefix) to fp32 rounding: every parameter's gradient included, for one and three channels,
with and without registers. A weight whose position block is transposed the wrong way fails.
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

# (B, T, g, P, C, H, p): one glimpse of one cell; a 7x7 grid of 2x2 glimpses; three channels with two prefix tokens.
CASES = ((1, 1, 1, 1, 1, 4, 2), (3, 5, 2, 1, 1, 56, 8), (2, 3, 2, 2, 3, 16, 4))


def _inputs(b: int, t: int, g: int, c: int, h: int, p: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Canvases, distinct cells per image ([B, T*g*g], glimpse by glimpse) and a per-column affine."""
    gen = torch.Generator(device=device).manual_seed(b * 100 + t)
    canvases = torch.randint(0, 256, (b, h, h, c), dtype=torch.uint8, generator=gen, device=device)
    n = (h // p) ** 2
    cells = torch.rand(b, n, generator=gen, device=device).argsort(1)[:, : t * g * g].contiguous()
    cpp = c * p * p
    scale = torch.rand(cpp, generator=gen, device=device) * 0.02 + 0.001
    shift = torch.randn(cpp, generator=gen, device=device)
    return canvases, cells, scale, shift


def check_rows(device: str, dtype: torch.dtype, cases: tuple[tuple[int, ...], ...]) -> None:
    """The kernel's rows against PyTorch's ops (``_glimpse_rows`` without the kernel): the 0s and 1s exactly, the
    pixels to one rounding of the dtype (a multiply-add fused in one and not the other rounds once less)."""
    from avex.train.glimpse_input import _glimpse_rows, glimpse_width

    for b, t, g, n_pre, c, h, p in cases:
        canvases, cells, scale, shift = _inputs(b, t, g, c, h, p, device)
        got = _glimpse_rows(True, canvases, cells, t, n_pre, p, scale, shift, dtype)
        want = _glimpse_rows(False, canvases, cells, t, n_pre, p, scale, shift, dtype)
        k = glimpse_width(c * p * p, (h // p) ** 2, n_pre)
        assert got.shape == want.shape == (b * t * (n_pre + g * g), k), (got.shape, want.shape)
        case = f"{(b, t, g, n_pre, c, h, p)} {dtype}"
        cpp = c * p * p
        assert torch.equal(got[:, cpp:], want[:, cpp:]), f"{case}: the one-hot and bias columns differ"
        tol = 2**-7 if dtype == torch.bfloat16 else 2e-7
        torch.testing.assert_close(got[:, :cpp], want[:, :cpp], rtol=tol, atol=tol, msg=f"{case}: the pixels")
        assert not torch.equal(got[:, :cpp], torch.zeros_like(got[:, :cpp])), case


def test_glimpse_rows_kernel_under_interpreter() -> None:
    pytest.importorskip("triton")
    out = interpreted(f"""
        import torch
        from test_train_glimpse_input import check_rows
        check_rows("cpu", torch.float32, {CASES!r})
        print("ok")
    """)
    assert out.strip() == "ok"


def _old_embedding(
    canvases: torch.Tensor,
    cells: torch.Tensor,
    t: int,
    p: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
    proj: torch.Tensor,
    bias: torch.Tensor,
    table: torch.Tensor,
    prefix: torch.Tensor,
) -> torch.Tensor:
    """The composition the product replaces, written out here: [B*T, P + G, D]."""
    b, h, w, c = canvases.shape
    gh, gw = h // p, w // p
    patches = canvases.view(b, gh, p, gw, p, c).permute(0, 1, 3, 5, 2, 4).reshape(b, gh * gw, c * p * p)
    pix = torch.stack([patches[i, cells[i]] for i in range(b)])  # [B, L, Cpp]
    x = shift + pix.float() * scale
    tokens = F.linear(x, proj, bias) + table[cells]  # [B, L, D]
    tokens = tokens.view(b * t, -1, proj.shape[0])
    return torch.cat([prefix.expand(b * t, -1, -1), tokens], dim=1)


@pytest.mark.parametrize("case", CASES)
def test_product_equals_the_old_composition(case: tuple[int, ...]) -> None:
    from avex.train.glimpse_input import glimpse_rows, glimpse_weight

    b, t, g, n_pre, c, h, p = case
    canvases, cells, scale, shift = _inputs(b, t, g, c, h, p)
    d, n = 24, (h // p) ** 2
    gen = torch.Generator().manual_seed(7)
    leaves = [torch.randn(*s, generator=gen) for s in ((d, c * p * p), (d,), (n, d), (n_pre, d))]
    mine = [x.clone().requires_grad_() for x in leaves]
    ref = [x.clone().requires_grad_() for x in leaves]
    rows = glimpse_rows(canvases, cells, t, n_pre, p, scale, shift, torch.float32)
    got = F.linear(rows, glimpse_weight(*mine, rows.shape[1])).view(b * t, n_pre + g * g, d)
    want = _old_embedding(canvases, cells, t, p, scale, shift, *ref)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    grad = torch.randn(want.shape, generator=gen)
    got.backward(grad)
    want.backward(grad)
    for name, x, y in zip(("proj", "bias", "table", "prefix"), mine, ref):
        assert y.grad is not None and x.grad is not None
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-4, msg=name)
    # The position block the other way round (a [D, N] table read as [N, D]) gives other tokens.
    if n > 1:
        swapped = glimpse_weight(mine[0], mine[1], mine[2].detach().t().reshape(n, d), mine[3], rows.shape[1])
        assert not torch.allclose(F.linear(rows, swapped).view_as(want), want, atol=1e-3)


def test_glimpse_rows_refuse_bad_input() -> None:
    from avex.train.glimpse_input import glimpse_rows, glimpse_weight

    canvases, cells, scale, shift = _inputs(2, 3, 2, 1, 16, 4)
    f32 = torch.float32
    with pytest.raises(ValueError, match="canvases must be uint8"):
        glimpse_rows(canvases.float(), cells, 3, 1, 4, scale, shift, f32)
    with pytest.raises(ValueError, match="patch=5"):
        glimpse_rows(canvases, cells, 3, 1, 5, scale, shift, f32)
    with pytest.raises(ValueError, match="a multiple of t=5"):
        glimpse_rows(canvases, cells, 5, 1, 4, scale, shift, f32)
    with pytest.raises(ValueError, match="col_scale and col_shift must be \\[16\\]"):
        glimpse_rows(canvases, cells, 3, 1, 4, scale[:3], shift, f32)
    with pytest.raises(ValueError, match="n_prefix"):
        glimpse_rows(canvases, cells, 3, -1, 4, scale, shift, f32)
    with pytest.raises(ValueError, match="width=8"):
        glimpse_weight(torch.zeros(4, 16), torch.zeros(4), torch.zeros(16, 4), torch.zeros(1, 4), 8)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glimpse_rows_on_cuda(dtype: torch.dtype) -> None:
    """The step's shapes: the shipped architecture (112 px, patch 8, 2x2 glimpses, T=12) and DeiT-III-S's pixels."""
    check_rows("cuda", dtype, ((256, 12, 2, 1, 1, 112, 8), (4, 9, 2, 1, 3, 224, 16)))
