"""The decoder's masked reconstruction loss (avex/train/recon_loss.py) against the PyTorch ops it replaces.

The kernels' loss agrees with the ops' to fp32 summation order (1e-5 relative) and pred's gradient to 1e-5 in fp32,
or to one bf16 rounding in bf16 (Triton 3.6's interpreter rounds fp32 to bf16 toward zero, CUDA to nearest) plus a few
fp32 steps of the target where pred cancels it (PyTorch on CUDA multiplies by 1/255 where the kernels divide). Under
Triton's interpreter on the CPU, on CUDA at the step's size, and without the interpreter (the ops themselves, checked
against a loop over the patches written here). A prediction equal to the target in channel-last column order gives a
loss near zero and one in channel-major order does not, so a wrong column order cannot pass.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest
import torch
from script_kit import interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (B, M, patch, C, H, W): one cell of a 2x2 grid; 37 of a 7x7 grid's cells per canvas (a row count that fills no
# whole program); 3 channels, where the column order within a patch matters.
CASES = ((1, 1, 2, 1, 4, 4), (3, 37, 8, 1, 56, 56), (2, 5, 4, 3, 16, 16))
STEP = (256, 148, 8, 1, 112, 112)  # the fused step's decoder: 148 of a 14x14 grid's cells


def make_inputs(
    device: str, b: int, m: int, patch: int, c: int, h: int, w: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random canvases, M distinct ascending unseen cells per canvas (as the fused step's), a prediction of unit scale,
    and per-channel statistics that differ between channels. Returns (pred fp32, canvases, unseen, mean, std)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n = (h // patch) * (w // patch)
    canvases = torch.randint(0, 256, (b, h, w, c), generator=gen, device=device, dtype=torch.uint8)
    unseen = torch.rand(b, n, generator=gen, device=device).argsort(1)[:, :m].sort(1).values
    pred = torch.randn(b, m, patch * patch * c, generator=gen, device=device)
    mean = torch.tensor([0.485, 0.456, 0.406][:c], device=device) if c <= 3 else torch.rand(c, device=device)
    std = torch.tensor([0.229, 0.224, 0.225][:c], device=device) if c <= 3 else torch.rand(c, device=device) + 0.5
    return pred, canvases, unseen, mean, std


def check_recon_loss(device: str, dtype: torch.dtype, cases: tuple[tuple[int, ...], ...]) -> int:
    """:func:`masked_pixel_mse` (the kernels where they run) against ``_masked_pixel_mse_torch`` for every case: the
    loss and pred's gradient. Returns how many took the kernels."""
    from avex.train.recon_loss import _masked_pixel_mse_torch, masked_pixel_mse

    took = 0
    for b, m, patch, c, h, w in cases:
        pred, canvases, unseen, mean, std = make_inputs(device, b, m, patch, c, h, w, seed=b + m + c)
        pred = pred.to(dtype)
        leaf, ref = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        got = masked_pixel_mse(leaf, canvases, unseen, patch, mean, std)
        want = _masked_pixel_mse_torch(ref, canvases, unseen, patch, mean, std)
        case = f"B={b} M={m} patch={patch} C={c} {h}x{w} {dtype}"
        assert got.shape == () and got.dtype == torch.float32, case
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=f"{case}: the loss differs")
        grad = torch.tensor(1.7, device=device)  # not 1: the backward must scale by the incoming gradient
        got.backward(grad)
        want.backward(grad)
        g, r = leaf.grad, ref.grad
        assert g is not None and r is not None and g.dtype == dtype, case
        if dtype == torch.float32:
            tol = 1e-5
            torch.testing.assert_close(g, r, rtol=tol, atol=tol * float(r.abs().max()), msg=f"{case}: the gradient")
        else:
            # One bf16 rounding, plus a few fp32 steps of the target (|target| < 4) times the gradient's scale
            # 2 * grad / count: PyTorch on CUDA divides by 255 and by the count as products with the reciprocals,
            # and where pred is within an fp32 step of the target that step is all of pred - target.
            atol = 2 * 1.7 / pred.numel() * 2**-19
            torch.testing.assert_close(g.float(), r.float(), rtol=2**-7, atol=atol, msg=f"{case}: the gradient")
        took += type(got.grad_fn).__name__ == "_MaskedPixelMseBackward"
    return took


def check_column_order(device: str) -> bool:
    """A prediction equal to the 3-channel case's target (channel-last columns, built here) plus noise of std 0.01:
    the loss is the noise's, about 1e-4, and far from the loss against the channel-major target. Returns whether the
    kernels ran."""
    from avex.train.recon_loss import masked_pixel_mse

    b, m, patch, c, h, w = CASES[2]
    _, canvases, unseen, mean, std = make_inputs(device, b, m, patch, c, h, w, seed=11)
    gw = w // patch
    cells = [[divmod(int(k), gw) for k in row] for row in unseen]
    blocks = torch.stack(
        [
            torch.stack([canvases[i, r * patch : (r + 1) * patch, q * patch : (q + 1) * patch] for r, q in row])
            for i, row in enumerate(cells)
        ]
    )  # [B, M, py, px, C] uint8
    norm = (blocks.float() / 255.0 - mean) / std
    target = norm.reshape(b, m, -1)  # channel-last: (py * patch + px) * C + ch
    channel_major = norm.permute(0, 1, 4, 2, 3).reshape(b, m, -1)  # the patch projection's order, not the loss's
    gen = torch.Generator(device=device).manual_seed(5)
    noise = 0.01 * torch.randn(target.shape, generator=gen, device=device)
    pred = (target + noise).requires_grad_()
    loss = masked_pixel_mse(pred, canvases, unseen, patch, mean, std)
    torch.testing.assert_close(loss, noise.square().mean(), rtol=1e-3, atol=0)
    wrong = masked_pixel_mse(channel_major + noise, canvases, unseen, patch, mean, std)
    assert float(wrong.detach()) > 100 * float(loss.detach()), (
        "the channel-major prediction fits as well: the column order is lost"
    )
    return type(loss.grad_fn).__name__ == "_MaskedPixelMseBackward"


@needs_triton
def test_recon_loss_kernels_equal_the_ops_under_interpreter() -> None:
    out = interpreted("""
        import torch
        from tests.test_train_recon_loss import CASES, check_column_order, check_recon_loss
        assert check_recon_loss("cpu", torch.float32, CASES) == len(CASES)
        assert check_recon_loss("cpu", torch.bfloat16, CASES) == len(CASES)
        assert check_column_order("cpu")
        print("ok")
    """)
    assert out.strip() == "ok"


def test_without_triton_the_ops_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyTorch ops on the CPU (no interpreter) against a loop over the patches: 3 channels, gradient too."""
    from avex.train.recon_loss import masked_pixel_mse

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b, m, patch, c, h, w = 2, 6, 4, 3, 12, 16  # a 3x4 grid: rows and columns of cells differ
    pred, canvases, unseen, mean, std = make_inputs("cpu", b, m, patch, c, h, w, seed=3)
    leaf, ref = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loss = masked_pixel_mse(leaf, canvases, unseen, patch, mean, std)
    assert type(loss.grad_fn).__name__ != "_MaskedPixelMseBackward"
    gw, total = w // patch, torch.zeros(())
    for i in range(b):
        for j in range(m):
            row, col = divmod(int(unseen[i, j]), gw)
            for py in range(patch):
                for px in range(patch):
                    for ch in range(c):
                        pixel = canvases[i, row * patch + py, col * patch + px, ch].float()
                        target = (pixel / 255.0 - mean[ch]) / std[ch]
                        total = total + (ref[i, j, (py * patch + px) * c + ch] - target) ** 2
    want = total / (b * m * patch * patch * c)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    loss.backward()
    want.backward()
    assert leaf.grad is not None and ref.grad is not None
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-8)


# (the argument the error must name, a change to the good call's arguments)
BAD: tuple[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]], ...] = (
    ("patch", lambda a: {"patch": 0}),
    ("canvases", lambda a: {"canvases": a["canvases"].float()}),
    ("canvases", lambda a: {"canvases": a["canvases"][0]}),
    ("canvases", lambda a: {"canvases": a["canvases"][:, :15]}),  # H not a multiple of the patch
    ("unseen", lambda a: {"unseen": a["unseen"][:, :, None]}),
    ("unseen", lambda a: {"unseen": a["unseen"][:1]}),
    ("unseen", lambda a: {"unseen": a["unseen"].int()}),
    ("pred", lambda a: {"pred": a["pred"][..., :16]}),  # Cpp not patch * patch * C
    ("pred", lambda a: {"pred": a["pred"][0]}),
    ("pred", lambda a: {"pred": a["pred"][:, :4]}),  # M not unseen's
    ("pred", lambda a: {"pred": a["pred"].long()}),
    ("mean", lambda a: {"mean": a["mean"][:1]}),
    ("std", lambda a: {"std": a["std"].repeat(16)}),  # the fused step's per-column vector, not per channel
)


@pytest.mark.parametrize(("name", "change"), BAD, ids=[f"{name}-{i}" for i, (name, _) in enumerate(BAD)])
def test_masked_pixel_mse_refuses_bad_inputs(name: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    from avex.train.recon_loss import masked_pixel_mse

    pred, canvases, unseen, mean, std = make_inputs("cpu", 2, 5, 4, 3, 16, 16, seed=0)
    args: dict[str, Any] = {"pred": pred, "canvases": canvases, "unseen": unseen, "patch": 4, "mean": mean, "std": std}
    args.update(change(args))
    with pytest.raises(ValueError, match=rf"masked_pixel_mse: {name} must"):
        masked_pixel_mse(**args)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_recon_loss_kernels_equal_the_ops_on_cuda(dtype: torch.dtype) -> None:
    """The compiled kernels at the step's size (256 canvases of 112x112, 148 unseen 8x8 patches each)."""
    assert check_recon_loss("cuda", dtype, (*CASES, STEP)) == len(CASES) + 1
    assert check_column_order("cuda")
