"""The training decoder's input sequence (avex/train/decoder_input.py) against the PyTorch ops it replaces.

The kernels' sequence equals the ops' bit for bit (each row one add, rounded once), in fp32 and bf16; the embedding's
gradient equals the gradient's slice exactly, and the mask token's (a sum over B x M rows) agrees to fp32 summation
order (1e-5 relative, plus 1e-5 of its largest entry), or to one rounding in bf16. Under Triton's interpreter on the
CPU, on CUDA at the step's sizes, and without the interpreter (the ops themselves). Triton 3.6's interpreter rounds
fp32 to bf16 toward zero (CUDA to nearest), so there the bf16 sequence is checked to one bf16 step, not bit for bit.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from script_kit import interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (B, L, M, N, dd): one seen and one unseen cell; a row count that fills no whole program; the shipped decoder's
# width with its 196-cell grid.
CASES = ((1, 1, 1, 4, 16), (3, 12, 37, 49, 48), (5, 48, 148, 196, 128))


def check_decoder_input(device: str, dtype: torch.dtype, cases: tuple[tuple[int, ...], ...], exact: bool = True) -> int:
    """The kernels (where they run) against ``_decoder_input_torch`` for every case; ``exact``: the sequence bit for
    bit (else to one step of its dtype). Returns how many took the kernels."""
    from avex.train.decoder_input import _decoder_input_torch, decoder_input

    took = 0
    for b, l_, m, n, d in cases:
        gen = torch.Generator(device=device).manual_seed(b + l_ + m)
        cells = torch.rand(b, n, generator=gen, device=device).argsort(1)  # distinct cells per row
        seen, unseen = cells[:, :l_], cells[:, l_ : l_ + m].sort(1).values
        e = torch.randn(b, 1 + l_, d, generator=gen, device=device).to(dtype)
        pos = torch.randn(n, d, generator=gen, device=device).to(dtype)
        mask = torch.randn(1, 1, d, generator=gen, device=device).to(dtype)
        leaves = [e.clone().requires_grad_(), mask.clone().requires_grad_()]
        refs = [e.clone().requires_grad_(), mask.clone().requires_grad_()]
        got = decoder_input(leaves[0], seen, unseen, pos, leaves[1])
        want = _decoder_input_torch(refs[0], seen, unseen, pos, refs[1])
        case = f"B={b} L={l_} M={m} dd={d} {dtype}"
        assert got.shape == (b, 1 + l_ + m, d) and got.dtype == dtype, case
        if exact:
            assert torch.equal(got, want), f"{case}: the sequence differs"
        else:
            torch.testing.assert_close(got, want, rtol=2**-7, atol=0, msg=f"{case}: the sequence differs")
        grad = torch.randn(want.shape, generator=gen, device=device).to(dtype)
        got.backward(grad)
        want.backward(grad)
        assert torch.equal(leaves[0].grad, refs[0].grad), f"{case}: the embedding's gradient differs"
        g, w = leaves[1].grad.float(), refs[1].grad.float()
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * float(w.abs().max()), msg=f"{case}: the mask's gradient")
        took += type(got.grad_fn).__name__ == "_DecoderInputBackward"
    return took


@needs_triton
def test_decoder_input_kernels_equal_the_ops_under_interpreter() -> None:
    out = interpreted("""
        import torch
        from tests.test_train_decoder_input import CASES, check_decoder_input
        assert check_decoder_input("cpu", torch.float32, CASES) == len(CASES)
        assert check_decoder_input("cpu", torch.bfloat16, CASES[:2], exact=False) == 2
        print("ok")
    """)
    assert out.strip() == "ok"


def test_without_triton_the_ops_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert check_decoder_input("cpu", torch.float32, CASES) == 0


def test_decoder_input_refuses_mismatched_shapes() -> None:
    from avex.train.decoder_input import decoder_input

    e, pos, mask = torch.zeros(2, 5, 8), torch.zeros(9, 8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"cells \[B, L\]"):
        decoder_input(e, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), pos, mask)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoder_input_kernels_equal_the_ops_on_cuda(dtype: torch.dtype) -> None:
    """The compiled kernels at the step's sizes (1,024 canvases of 196 cells, 12 glimpses of 4 seen)."""
    assert check_decoder_input("cuda", dtype, (*CASES, (1024, 48, 148, 196, 128))) == len(CASES) + 1
