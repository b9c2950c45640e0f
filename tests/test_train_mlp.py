"""The fused step's MLP branch (avex/train/mlp.py: fc1 and the exact GELU in one Triton product, the backward's
product through fc2 times the GELU's slope, fc1's bias gradient in its epilogue) against PyTorch's composition
``F.linear(F.gelu(F.linear(x, w1, b1)), w2)`` under PyTorch's autograd.

In fp32 under Triton's interpreter (IEEE products: the kernels' fp32 path must not round to tf32), in fp16 there
(Triton 3.6's interpreter multiplies bf16 tiles wrongly: ``tl.dot`` of two bf16 tiles gives ~1e10) and in bf16
and fp32 on CUDA, each against an fp32 reference on the same rounded inputs, and on the CPU without the
interpreter (PyTorch's ops in the kernels' place). Widths: 48 (not a power of two, and not a multiple of the K step of 64), 192 (the shipped
ViT's, fc1 768 wide); row counts that fill no whole tile of 128 rows.

fp32 tolerances: 1e-5 relative / 2e-5 absolute plus 1e-6 of the largest entry (a bias gradient sums hundreds of
rows; the summation order differs).
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

ROWS = ((1, 1), (2, 150))  # [B, S] rows of the branch's input: one row; 300 rows, the last tile of 128 partial


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    atol = 2 * tol + tol / 10 * float(want.detach().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def mlp_case(device: str, dtype: torch.dtype, d: int, rows: tuple[int, int], tol: float) -> bool:
    """train_mlp at width d (fc1 4d wide, fc2 back to d) against the fp32 composition on the same inputs rounded
    to ``dtype``: the output and the gradients of x, w1, b1 and w2. Returns whether the call took the kernels."""
    from avex.train.mlp import train_mlp

    gen = torch.Generator(device=device).manual_seed(d + rows[1])
    f = 4 * d
    x = torch.randn(*rows, d, generator=gen, device=device)
    w1 = torch.randn(f, d, generator=gen, device=device) / d**0.5
    b1 = torch.randn(f, generator=gen, device=device)  # pre-activations across GELU's curved part
    w2 = torch.randn(d, f, generator=gen, device=device) / f**0.5
    leaves = [t.to(dtype).requires_grad_() for t in (x, w1, b1, w2)]
    refs = [t.detach().float().requires_grad_() for t in leaves]
    got = train_mlp(*leaves)
    want = F.linear(F.gelu(F.linear(refs[0], refs[1], refs[2])), refs[3])
    case = f"D={d} rows={rows} {dtype}"
    assert got.dtype == dtype
    _close(got, want, tol, f"{case} out")
    grad = torch.randn(want.shape, generator=gen, device=device)
    got.backward(grad.to(dtype))
    want.backward(grad)
    for name, leaf, ref in zip(("x", "w1", "b1", "w2"), leaves, refs):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, (case, name)
        _close(leaf.grad, ref.grad, tol, f"{case} d{name}")
    return type(got.grad_fn).__name__ == "_MlpBackward"


# ------------------------------------------------------------------------------ the kernels (interpreter)
@needs_triton
def test_mlp_kernels_match_pytorch_under_interpreter() -> None:
    """fp32: every case takes the kernels and equals PyTorch's composition; fp16: within its rounding of fp32.
    The check fails on a GELU slope without its second term (the erf part alone)."""
    out = interpreted("""
        import torch
        from tests.test_train_mlp import ROWS, mlp_case
        assert all(mlp_case("cpu", torch.float32, d, rows, 1e-5) for d in (48, 192) for rows in ROWS)
        assert mlp_case("cpu", torch.float16, 48, (2, 150), 5e-3)
        import avex.train.mlp as mlp
        true_grad = mlp.gelu_input_grad
        def without_pdf(dy, weight, pre):  # the slope's x * pdf(x) term dropped
            dpre = (dy.float() @ weight.float()) * 0.5 * (1 + torch.erf(pre.float() / 2**0.5))
            return dpre.to(dy.dtype), dpre.sum(0).to(dy.dtype)
        mlp.gelu_input_grad = without_pdf
        try:
            mlp_case("cpu", torch.float32, 48, (1, 1), 1e-5)
        except AssertionError as err:
            assert "dx" in str(err) or "dw1" in str(err) or "db1" in str(err), err
        else:
            raise AssertionError("the check missed a wrong GELU slope")
        mlp.gelu_input_grad = true_grad
        print("ok")
    """)
    assert out.strip() == "ok"


# ------------------------------------------------------------------------------ PyTorch's ops in their place
def test_without_triton_the_mlp_is_pytorch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU without the interpreter no call takes the kernels, and the results are the same."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not any(mlp_case("cpu", torch.float32, d, rows, 1e-5) for d in (48, 192) for rows in ROWS)


# ------------------------------------------------------------------------------ CUDA
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mlp_kernels_match_pytorch_on_cuda(dtype: torch.dtype) -> None:
    """The compiled kernels at a step's sizes (~100k rows of 192, fc1 768 wide; the decoder's 128), bf16 within
    its rounding of fp32 (2e-2 of each tensor's largest entry, as the layer norm's CUDA test)."""
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert all(mlp_case("cuda", dtype, d, rows, tol) for d in (192, 128) for rows in ((1000, 98), (37, 5)))
