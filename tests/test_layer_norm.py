"""Fast layer norm for many short rows (avex/layer_norm.py) and where inference uses it.

Tolerances against ``F.layer_norm`` on the same input:

* fp32: 2e-5 absolute (both compute the mean and variance in fp32; only the summation order differs);
* bf16 and fp16: one rounding of the output to the input's dtype (the kernel rounds its fp32 result once, as
  PyTorch's kernel does), checked as ``rtol = 2**-7`` (bf16's spacing) or ``2**-10`` (fp16's) plus a small
  absolute term for outputs near 0.

The kernel runs on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton is imported, hence the
subprocess); on CPU otherwise every norm is the module's own, bit for bit.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from script_kit import interpreted

import avex.kernel_fallback as kf
import avex.layer_norm as ln

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available() or kf.triton is None, reason="needs CUDA and Triton")
TOL = {  # (rtol, atol) of the kernel against F.layer_norm, by dtype (see the module docstring)
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (2**-7, 1e-2),
    torch.float16: (2**-10, 2e-3),
}


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """got within TOL of want (same dtype); shapes and dtypes equal."""
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = TOL[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ the kernel (interpreter)
@needs_triton
def test_kernel_matches_layer_norm_under_interpreter() -> None:
    """fp32 and bf16; 192 and 768 features (a ViT-S-like and ViT-B's width) and one not a power of two; odd row
    counts (one row, a partial last program); rows read in place (a CLS token's, a slice of tokens, the tokens of
    every other sequence), rows copied first (a transposed tensor); launch settings; the per-row statistics of the
    training forward."""
    out = interpreted("""
        import torch
        import torch.nn.functional as F
        from avex.layer_norm import layer_norm, layer_norm_forward
        from tests.test_layer_norm import close
        gen = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            for shape in ((3, 7, 192), (1, 1, 192), (2, 5, 768), (37, 100)):
                n = shape[-1]
                x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
                w, b = (torch.randn(n, generator=gen).to(dtype) for _ in range(2))
                want = F.layer_norm(x, (n,), w, b, 1e-6)
                close(layer_norm(x, w, b, 1e-6), want)
                close(layer_norm(x, w, b, 1e-6, block_m=2, num_warps=1), want)  # 11 programs, the last partial
            hidden = (torch.randn(4, 9, 192, generator=gen) * 2).to(dtype)
            w, b = (torch.randn(192, generator=gen).to(dtype) for _ in range(2))
            for view in (hidden[:, 0], hidden[:, 1:], hidden[::2, 3:7], hidden.transpose(0, 1)):
                assert not view.is_contiguous()
                got = layer_norm(view, w, b, 1e-6)
                close(got, F.layer_norm(view, (192,), w, b, 1e-6))
                assert got.is_contiguous()
        x = torch.randn(5, 11, 192, generator=gen)
        w, b = torch.randn(192, generator=gen), torch.randn(192, generator=gen)
        y, mean, rstd = layer_norm_forward(x, w, b, 1e-5)
        y_ref, mean_ref, rstd_ref = torch.native_layer_norm(x, (192,), w, b, 1e-5)
        close(y, y_ref)
        assert mean.shape == rstd.shape == (55,) and mean.dtype == rstd.dtype == torch.float32
        torch.testing.assert_close(mean, mean_ref.view(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rstd, rstd_ref.view(-1), rtol=1e-5, atol=1e-6)
        assert torch.equal(y, layer_norm(x, w, b, 1e-5))  # the same arithmetic with or without statistics
        assert layer_norm(x[:0], w, b, 1e-5).shape == (0, 11, 192)  # no rows: nothing launched
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_triton
def test_norm_forward_takes_the_kernel_where_it_applies_under_interpreter() -> None:
    """torch's and timm's LayerNorm modules go through the kernel without autograd and with enough rows; with
    autograd, with few rows, without a bias, under autocast, they run themselves (bit-equal)."""
    out = interpreted("""
        import torch
        import torch.nn as nn
        import avex.layer_norm as ln
        from timm.layers import LayerNorm as TimmLayerNorm
        from tests.test_layer_norm import close
        calls = []
        kernel = ln.layer_norm
        ln.layer_norm = lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(ln.MIN_ROWS // 32, 32, 48, generator=gen)
        for norm in (nn.LayerNorm(48, eps=1e-6), TimmLayerNorm(48)):
            with torch.no_grad():
                norm.weight.normal_(generator=gen)
                norm.bias.normal_(generator=gen)
                close(ln.norm_forward(norm, x), norm(x))
                assert torch.equal(ln.norm_forward(norm, x[:2]), norm(x[:2]))  # 64 rows: the module
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    assert torch.equal(ln.norm_forward(norm, x), norm(x))
            assert torch.equal(ln.norm_forward(norm, x), norm(x))  # autograd on: the module
        assert calls == [x.shape, x.shape], calls
        no_bias = nn.LayerNorm(48, bias=False)
        with torch.inference_mode():
            assert torch.equal(ln.norm_forward(no_bias, x), no_bias(x)) and len(calls) == 2
            assert torch.equal(ln.norm_forward(nn.Identity(), x), x)
            fp32_weights = nn.LayerNorm(48)
            assert torch.equal(ln.norm_forward(fp32_weights, x.bfloat16()), fp32_weights(x.bfloat16()))
        assert len(calls) == 2, calls
        print("ok")
    """)
    assert out.strip() == "ok"


# ------------------------------------------------------------------------------------------------- CPU
def test_on_cpu_every_norm_is_the_modules_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the interpreter, CPU tensors never reach the kernel: the same tensor as the module's, bit for bit,
    with or without autograd, at any size (the env's episodes on CPU stay what they were)."""

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel must not run on CPU outside the interpreter")

    monkeypatch.setattr(ln, "layer_norm", no_kernel)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(0)
    norm = nn.LayerNorm(192, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(ln.MIN_ROWS // 16, 17, 192, generator=gen).to(dtype)
        norm = norm.to(dtype)
        with torch.inference_mode():
            assert torch.equal(ln.norm_forward(norm, x), norm(x))
        assert torch.equal(ln.norm_forward(norm, x), norm(x))


@needs_triton
def test_bad_arguments_are_named() -> None:
    x, w = torch.randn(4, 192), torch.randn(192)
    with pytest.raises(ValueError, match=r"weight and bias must be \[192\]"):
        ln.layer_norm(x, w[:100], w, 1e-6)
    with pytest.raises(ValueError, match="block_m must be a power of two, got 3"):
        ln.layer_norm(x, w, w, 1e-6, block_m=3)


def test_kernel_failure_falls_back_to_the_module_with_one_warning(break_kernel: Any) -> None:
    """A machine where Triton cannot build the kernel still runs: the module's result, one warning."""
    break_kernel(ln, "layer_norm")
    norm = nn.LayerNorm(64)
    x = torch.randn(ln.MIN_ROWS, 64)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="Triton layer norm kernel failed.*C compiler"):
            assert torch.equal(ln.norm_forward(norm, x), norm(x))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            assert torch.equal(ln.norm_forward(norm, x), norm(x))


def test_few_rows_take_the_kernel_only_inside_a_cuda_graph_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below MIN_ROWS the module's own kernel launches faster from Python; a captured graph pays no launch at replay,
    so there the kernel (faster on the device) takes any row count."""
    monkeypatch.setattr(ln, "_kernel_may_run", lambda x: True)
    norm = nn.LayerNorm(64)
    few, many = torch.randn(5, 64), torch.randn(ln.MIN_ROWS, 64)
    assert not ln.norm_applies(norm, few) and ln.norm_applies(norm, many)
    monkeypatch.setattr(ln, "_capturing", lambda x: True)
    assert ln.norm_applies(norm, few) and ln.norm_applies(norm, many)
    assert not ln.norm_applies(nn.LayerNorm(64, elementwise_affine=False), few)  # the other conditions still hold


# ------------------------------------------------------------------------------------------------ CUDA
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_matches_layer_norm_on_cuda(dtype: torch.dtype) -> None:
    """The env's shapes (many rows of 192, the decoder's 128, ViT-B's 768), a CLS token's strided rows, more
    rows x features than 2**31 elements would need 32-bit offsets for (none here: 64-bit offsets are used)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((4096, 5, 192), (1024, 49, 192), (512, 197, 128), (64, 197, 768), (3, 100)):
        n = shape[-1]
        x = (torch.randn(shape, generator=gen, device="cuda") * 3 + 1).to(dtype)
        w, b = (torch.randn(n, generator=gen, device="cuda").to(dtype) for _ in range(2))
        close(ln.layer_norm(x, w, b, 1e-6), F.layer_norm(x, (n,), w, b, 1e-6))
        if x.ndim == 3:
            for view in (x[:, 0], x[:, 1:], x[::2, 2:]):  # read in place
                close(ln.layer_norm(view, w, b, 1e-6), F.layer_norm(view, (n,), w, b, 1e-6))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_on_cuda_with_the_kernel_keeps_logits_and_entropy(dtype: torch.dtype, monkeypatch) -> None:
    """A TORE step and its entropy map on CUDA with every norm on the kernel against the modules' own norms on the
    same GPU (everything else equal): fp32 within 1e-3, bf16 within the model's own bf16 noise."""
    from tests.test_model import G, canvases, glimpses, make, random_actions

    monkeypatch.setattr(ln, "MIN_ROWS", 1)  # the test's small batch through the kernel too
    model = make().to("cuda", dtype)
    geo = model.geometry(G)
    pix, coords = glimpses(model, canvases(64), random_actions(64, 5, geo), geo)
    calls = []
    kernel = ln.layer_norm
    monkeypatch.setattr(ln, "layer_norm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with torch.no_grad():
        out = model.forward_glimpses(pix.cuda(), coords.cuda(), 2)
        got = (out.logits, model.decode(out, recon=False)[1])
        assert len(calls) >= 4, calls  # block norms, the final norm of CLS and tokens, the decoder's
        monkeypatch.setattr(ln, "MIN_ROWS", 1 << 40)
        out = model.forward_glimpses(pix.cuda(), coords.cuda(), 2)
        want = (out.logits, model.decode(out, recon=False)[1])
    tol = 1e-3 if dtype == torch.float32 else 0.3
    for g, w in zip(got, want):
        assert g is not None and w is not None and (g.float() - w.float()).abs().max().item() < tol


@cuda
def test_a_captured_graph_norms_few_rows_with_the_kernel_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a capture a shape never launched before (5 rows: a batch-1 step's tokens) takes the kernel, which the
    capture holds (its first launch, compilation included, inside it) and each replay repeats on new input."""
    norm = nn.LayerNorm(768).cuda().to(torch.bfloat16)
    x = torch.randn(1, 5, 768, device="cuda", dtype=torch.bfloat16)
    calls = []
    kernel = ln.layer_norm
    monkeypatch.setattr(ln, "layer_norm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        with torch.cuda.graph(graph):
            y = ln.norm_forward(norm, x)
        assert calls == [1]
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            close(y, F.layer_norm(x, (768,), norm.weight, norm.bias, norm.eps))
