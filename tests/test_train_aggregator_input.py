"""The training aggregator's input (avex/train/aggregator_input.py) against the PyTorch ops it replaces.

The glimpse rows are copies, so they and their gradients equal the ops' bit for bit, in fp32 and bf16. The mean rows (an
fp32 sum over the glimpses divided by T, rounded once) agree to 1e-6 relative plus 1e-6 absolute in fp32 (the order of
summation; the tokens are of order 1), and to one bf16 rounding in bf16, as the prefix tokens' gradient (the output's
gradient divided by T) does. Under Triton's interpreter on the CPU, on CUDA at the step's size, and without the
interpreter (the ops themselves, checked against loops written here). Triton 3.6's interpreter rounds fp32 to bf16
toward zero (CUDA to nearest), and PyTorch's CUDA mean multiplies by 1/T where the kernel divides, so the bf16 mean rows
are checked to one bf16 step.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from script_kit import interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (B, T, P, G, D): one glimpse of one token; a row count that fills no whole program and a width short of a power of
# two; two prefix tokens over 12 glimpses at the shipped width; no prefix at all.
CASES = ((1, 1, 1, 1, 16), (3, 7, 1, 4, 48), (2, 12, 2, 4, 192), (2, 3, 0, 5, 32))


def check_aggregator_input(device: str, dtype: torch.dtype, cases: tuple[tuple[int, ...], ...]) -> int:
    """The kernels (where they run) against ``_aggregator_input_torch`` for every case, forward and x's gradient.
    Returns how many took the kernels."""
    from avex.train.aggregator_input import _aggregator_input_torch, aggregator_input

    # One bf16 rounding is at most 2**-7 relative (8 significant bits); fp32 differs only in summation order, which
    # a mean near 0 (a sum that cancels) needs an absolute bound for.
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    took = 0
    for b, t, p, g, d in cases:
        gen = torch.Generator(device=device).manual_seed(b + t + p + g + d)
        x = torch.randn(b, t, p + g, d, generator=gen, device=device).to(dtype)
        leaf, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = aggregator_input(leaf, p)
        want = _aggregator_input_torch(ref, p)
        case = f"B={b} T={t} P={p} G={g} D={d} {dtype}"
        assert got.shape == (b, p + t * g, d) and got.dtype == dtype, case
        assert torch.equal(got[:, p:], want[:, p:]), f"{case}: the glimpse rows differ"
        torch.testing.assert_close(got[:, :p], want[:, :p], rtol=tol, atol=1e-6, msg=f"{case}: the mean rows differ")
        grad = torch.randn(want.shape, generator=gen, device=device).to(dtype)
        got.backward(grad)
        want.backward(grad)
        assert leaf.grad is not None and ref.grad is not None
        assert torch.equal(leaf.grad[:, :, p:], ref.grad[:, :, p:]), f"{case}: the glimpse tokens' gradient differs"
        torch.testing.assert_close(
            leaf.grad[:, :, :p], ref.grad[:, :, :p], rtol=tol, atol=0, msg=f"{case}: the prefix gradient differs"
        )
        took += type(got.grad_fn).__name__ == "_AggregatorInputBackward"
    return took


def check_glimpse_order(device: str) -> None:
    """Two glimpses swapped in x swap their rows of the output and leave the mean rows as they were (to the order
    of summation): a kernel that mixed up the glimpse and token indices (or read the glimpses out of order) fails
    here."""
    from avex.train.aggregator_input import aggregator_input

    b, t, p, g, d = 2, 3, 1, 4, 16
    x = torch.randn(b, t, p + g, d, generator=torch.Generator(device=device).manual_seed(7), device=device)
    swapped = x[:, [1, 0, 2]]
    out, out_swapped = aggregator_input(x, p), aggregator_input(swapped, p)
    assert not torch.equal(out, out_swapped)
    torch.testing.assert_close(out_swapped[:, :p], out[:, :p], rtol=1e-6, atol=1e-6)
    assert torch.equal(out_swapped[:, p : p + g], out[:, p + g : p + 2 * g])
    assert torch.equal(out_swapped[:, p + g : p + 2 * g], out[:, p : p + g])
    assert torch.equal(out_swapped[:, p + 2 * g :], out[:, p + 2 * g :])
    assert torch.equal(out[:, p + g : p + 2 * g], x[:, 1, p:])  # row P + t*G + k is x[:, t, P + k]


@needs_triton
def test_aggregator_input_kernels_equal_the_ops_under_interpreter() -> None:
    out = interpreted("""
        import torch
        from tests.test_train_aggregator_input import CASES, check_aggregator_input, check_glimpse_order
        assert check_aggregator_input("cpu", torch.float32, CASES) == len(CASES)
        assert check_aggregator_input("cpu", torch.bfloat16, CASES) == len(CASES)
        check_glimpse_order("cpu")
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_triton_the_ops_run(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The PyTorch ops (no interpreter on a CPU tensor) against loops over b and t written here, in fp64: the mean
    rows to an fp32 sum's error (1e-6 absolute, the tokens being of order 1) or one bf16 rounding."""
    from avex.train.aggregator_input import aggregator_input

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_glimpse_order("cpu")
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    for b, t, p, g, d in CASES:
        gen = torch.Generator().manual_seed(b * t + g)
        x = torch.randn(b, t, p + g, d, generator=gen).to(dtype).requires_grad_()
        got = aggregator_input(x, p)
        assert type(got.grad_fn).__name__ != "_AggregatorInputBackward"
        grad = torch.randn(got.shape, generator=gen).to(dtype)
        got.backward(grad)
        assert x.grad is not None
        want = torch.empty(b, p + t * g, d, dtype=torch.float64)
        want_dx = torch.empty(b, t, p + g, d, dtype=torch.float64)
        for bi in range(b):
            total = torch.zeros(p, d, dtype=torch.float64)
            for ti in range(t):
                total += x[bi, ti, :p].double()
                want[bi, p + ti * g : p + (ti + 1) * g] = x[bi, ti, p:].double()
                want_dx[bi, ti, :p] = grad[bi, :p].double() / t
                want_dx[bi, ti, p:] = grad[bi, p + ti * g : p + (ti + 1) * g].double()
            want[bi, :p] = total / t
        case = f"B={b} T={t} P={p} G={g} D={d} {dtype}"
        assert torch.equal(got[:, p:].double(), want[:, p:]), f"{case}: the glimpse rows differ"
        assert torch.equal(x.grad[:, :, p:].double(), want_dx[:, :, p:]), f"{case}: the glimpse gradient differs"
        torch.testing.assert_close(got[:, :p].double(), want[:, :p], rtol=tol, atol=1e-6, msg=f"{case}: mean rows")
        torch.testing.assert_close(
            x.grad[:, :, :p].double(), want_dx[:, :, :p], rtol=tol, atol=1e-6, msg=f"{case}: the prefix gradient"
        )


def test_aggregator_input_refuses_bad_input() -> None:
    from avex.train.aggregator_input import aggregator_input

    with pytest.raises(ValueError, match=r"x must be 4-D .*\(2, 5, 8\)"):
        aggregator_input(torch.zeros(2, 5, 8), 1)
    for n_prefix in (-1, 6):
        with pytest.raises(ValueError, match=rf"n_prefix must be in 0\.\.5 .*got {n_prefix}"):
            aggregator_input(torch.zeros(2, 3, 5, 8), n_prefix)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_aggregator_input_kernels_equal_the_ops_on_cuda(dtype: torch.dtype) -> None:
    """The compiled kernels at the step's size (1,024 canvases, 12 glimpses of a CLS and 4 tokens, width 192)."""
    assert check_aggregator_input("cuda", dtype, (*CASES, (1024, 12, 1, 4, 192))) == len(CASES) + 1
    check_glimpse_order("cuda")
