"""Attention on TORE's short sequences: the block forward that routes it, and the Triton kernel.

The kernel runs on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton is imported,
hence the subprocesses); its bf16 matmul is only right on a GPU, so bf16 is checked by the CUDA test.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import pytest
import torch
from script_kit import interpreted

from avex.attention import block_forward, reference_attention, run_blocks, short_attention_available
from avex.model import create_tore

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


MODELS_WITH_LAYER_SCALE = [("vit_tiny_patch16_224", {}), ("deit3_small_patch16_224", dict(embed_dim=64, num_heads=2))]


def _vit_blocks(model: str, **kw) -> torch.nn.Module:
    tore = create_tore(model, img_size=32, patch_size=8, in_chans=3, num_classes=5, depth=2, **kw)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tore.parameters():  # timm's init leaves biases and layer scales near zero; randomise all
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return tore.vit.blocks.eval()


@pytest.mark.parametrize("model,kw", MODELS_WITH_LAYER_SCALE)
def test_block_forward_equals_timm_block(model: str, kw: dict) -> None:
    """block_forward re-implements timm's Block.forward: it must agree with it, with and without a key mask."""
    blocks = _vit_blocks(model, **kw)
    x = torch.randn(3, 9, blocks[0].norm1.normalized_shape[0], generator=torch.Generator().manual_seed(1))
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 5:] = False
    valid[2, 2:] = False
    with torch.no_grad():
        for blk in blocks:
            torch.testing.assert_close(block_forward(blk, x), blk(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                block_forward(blk, x, valid), blk(x, attn_mask=valid[:, None, None, :]), atol=1e-5, rtol=1e-5
            )


def test_reference_attention_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"qkv must be \[B, S, 3\*H\*Dh\]"):
        reference_attention(torch.zeros(2, 5, 100), heads=3)
    with pytest.raises(ValueError, match="valid must be a bool key mask"):
        reference_attention(torch.zeros(2, 5, 96), heads=2, valid=torch.ones(2, 4, dtype=torch.bool))


def test_run_blocks_on_cpu_is_plain_timm() -> None:
    """Without CUDA or the interpreter the blocks run as timm's own, bit for bit."""
    blocks = _vit_blocks("vit_tiny_patch16_224")
    x = torch.randn(2, 5, 192)
    with torch.no_grad():
        expect = blocks[1](blocks[0](x))
        torch.testing.assert_close(run_blocks(blocks, x), expect, atol=0, rtol=0)


@needs_triton
def test_kernel_matches_sdpa_under_interpreter() -> None:
    """fp32 and fp16, 1..64 tokens, default and wider padding (block_s), with and without padding masks."""
    out = interpreted("""
        import torch
        from avex.attention import short_attention, reference_attention
        gen = torch.Generator().manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
            for s in (1, 5, 16, 17, 49, 64):
                qkv = torch.randn(3, s, 3 * 2 * 32, generator=gen).to(dtype)
                valid = torch.rand(3, s, generator=gen) > 0.4
                valid[:, 0] = True
                for v in (None, valid):
                    want = reference_attention(qkv.float(), 2, v)
                    for block_s in [None] + ([32] if s <= 16 else []):
                        got = short_attention(qkv, 2, v, block_s=block_s, num_warps=2 if block_s else None).float()
                        err = (got - want).abs().max().item()
                        assert got.shape == (3, s, 64) and err < tol, (dtype, s, block_s, v is not None, err)
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_triton
def test_kernel_rejects_what_it_cannot_run() -> None:
    out = interpreted("""
        import torch
        from avex.attention import short_attention
        cases = [(torch.zeros(1, 65, 96), "1..64 tokens"), (torch.zeros(1, 5, 3 * 2 * 24), "power of two"),
                 (torch.zeros(1, 5, 96, dtype=torch.float64), "fp16/bf16/fp32")]
        cases.append((torch.zeros(1, 9, 192), "block_s must be a power of two >= 16 and >= the sequence length 9"))
        for qkv, msg in cases:
            try:
                short_attention(qkv, 2, block_s=8 if qkv.shape[1] == 9 else None)
            except ValueError as e:
                assert msg in str(e), e
            else:
                raise AssertionError(f"accepted {tuple(qkv.shape)} {qkv.dtype}")
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_triton
def test_tore_episode_with_kernel_equals_sdpa() -> None:
    """A whole cached episode (iterator, aggregator, uneven rows with a key mask) through the kernel gives
    the logits of PyTorch's attention, and the kernel really ran (every block of every step)."""
    out = interpreted("""
        import os
        import numpy as np
        import torch
        import avex.attention as att
        from avex.model import create_tore
        tore = create_tore("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, num_classes=5, depth=4).eval()
        geo = tore.geometry(2)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in tore.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        canv = torch.randint(0, 256, (3, 32, 32, 1), generator=gen, dtype=torch.uint8)
        calls = []
        kernel = att.short_attention
        att.short_attention = lambda *a, **k: calls.append(1) or kernel(*a, **k)

        def episode(choice, K=2):
            os.environ["AVEX_SDPA"] = choice
            cache = tore.init_cache(3, 4, K, geo.tokens_per_glimpse)
            logits = []
            with torch.inference_mode():
                for t in range(4):
                    if t == 2:
                        tore.reset_cache(cache, np.array([1]))  # row 1 restarts: uneven rows, key mask
                    r, c = (torch.as_tensor(v) for v in geo.action_to_patch(np.array([t, (3 * t) % 9, 8 - t])))
                    pix = geo.cut(canv, r, c).float() / 255
                    logits.append(tore.step(cache, pix, geo.glimpse_coords(r, c)).logits)
            return torch.stack(logits)

        want = episode("default")
        assert not calls
        got = episode("triton,math")
        # 4 steps x (2 iterator + 2 aggregator blocks), and the empty pass (2 iterator blocks) at init and reset
        assert len(calls) == 4 * 4 + 2 * 2, len(calls)
        err = (got - want).abs().max().item()
        assert err < 1e-4, err
        print("ok")
    """)
    assert out.strip() == "ok"


def check_fused_blocks(device: str, dtype: torch.dtype, batch: int) -> None:
    """run_blocks on the kernels' path fuses each residual add with the norm that reads its sum next (the attention
    branch's with norm2, the MLP branch's with the next block's norm1, the last alone), and gives what block_forward
    gives block after block: with and without a key mask, with and without layer scale. A block in training mode
    leaves the fusion out. fp32 within 1e-5; fp16 / bf16 no further from fp32 than block_forward's own rounding."""
    import avex.attention as att

    calls: list = []
    fused = att.residual_norm
    att.residual_norm = lambda *a: calls.append(a[-1]) or fused(*a)
    try:
        for model, kw in MODELS_WITH_LAYER_SCALE:
            blocks = _vit_blocks(model, **kw).to(device)
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(batch, 9, blocks[0].norm1.normalized_shape[0], generator=gen).to(device)
            valid = torch.rand(batch, 9, generator=gen).to(device) > 0.3
            valid[:, 0] = True
            for v in (None, valid):
                with torch.no_grad():
                    want = x
                    for blk in blocks:  # fp32: the reference for every dtype
                        want = att.block_forward(blk, want, v)
                    plain = x.to(dtype)
                    for blk in blocks.to(dtype):
                        plain = att.block_forward(blk, plain, v)
                    calls.clear()
                    got = att.run_blocks(blocks, x.to(dtype), v)
                    blocks.float()
                want_calls = [blocks[0].norm2, blocks[1].norm1, blocks[1].norm2, None]
                assert calls == want_calls, (model, calls)
                err, rounding = ((y.float() - want).abs().max().item() for y in (got, plain))
                assert err <= (1e-5 if dtype == torch.float32 else 2 * rounding + 1e-3), (model, dtype, err, rounding)
            blocks[1].train()
            calls.clear()
            with torch.no_grad():
                att.run_blocks(blocks, x)
            assert not calls, "a block in training mode must leave the fusion out"
    finally:
        att.residual_norm = fused


@needs_triton
def test_fused_blocks_equal_block_forward_under_interpreter() -> None:
    out = interpreted("""
        import torch
        import avex.layer_norm as ln
        from tests.test_attention import check_fused_blocks
        ln.MIN_ROWS = 1  # the test's few rows through the kernels
        check_fused_blocks("cpu", torch.float32, batch=3)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_residual_norm_failure_falls_back_to_pytorch_with_one_warning(break_kernel: Any) -> None:
    """A machine where Triton cannot build the residual norm kernel gets PyTorch's add and norm, with one warning."""
    import avex.layer_norm as ln

    break_kernel(ln, "residual_norm_forward")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    b, gamma = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="Triton residual norm kernel failed.*C compiler"):
            z, n = ln.residual_norm(x, y, b, gamma, norm)
        torch.testing.assert_close(z, x + (y + b) * gamma)
        torch.testing.assert_close(n, norm(x + (y + b) * gamma))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            z, n = ln.residual_norm(x, y, b, None, None)
        assert torch.equal(z, x + (y + b)) and n is z


@pytest.mark.skipif(not torch.cuda.is_available() or not short_attention_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_blocks_equal_block_forward_on_cuda(dtype: torch.dtype) -> None:
    check_fused_blocks("cuda", dtype, batch=512)  # 4,608 rows: past MIN_ROWS


@pytest.mark.skipif(not torch.cuda.is_available() or not short_attention_available(), reason="needs CUDA and Triton")
def test_fused_blocks_run_inside_a_cuda_graph_on_few_rows_cuda() -> None:
    """Below MIN_ROWS the fusion runs only while a CUDA graph is captured (no launch to pay at replay); the replay of
    new input gives block_forward's result."""
    import avex.attention as att

    blocks = _vit_blocks("deit3_small_patch16_224", embed_dim=64, num_heads=2).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 5, 64, device="cuda", generator=gen)
    calls: list = []
    fused = att.residual_norm
    att.residual_norm = lambda *a: calls.append(1) or fused(*a)
    try:
        with torch.no_grad():
            att.run_blocks(blocks, x)
            assert not calls  # 10 rows from Python: PyTorch's kernels
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles here
                att.fused_blocks(list(blocks), x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = att.run_blocks(blocks, x)
            assert len(calls) >= 4
            x.copy_(torch.randn(2, 5, 64, device="cuda", generator=gen))
            graph.replay()
            want = att.block_forward(blocks[1], att.block_forward(blocks[0], x))
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    finally:
        att.residual_norm = fused


@pytest.mark.skipif(not torch.cuda.is_available() or not short_attention_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_matches_sdpa_on_cuda(dtype: torch.dtype) -> None:
    from avex.attention import short_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    for s in (1, 5, 17, 49, 64):
        qkv = torch.randn(64, s, 3 * 12 * 64, device="cuda", generator=gen).to(dtype)
        valid = torch.rand(64, s, device="cuda", generator=gen) > 0.4
        valid[:, 0] = True
        for v in (None, valid):
            want = reference_attention(qkv.float(), 12, v)
            tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
            for block_s in [None] + ([32] if s <= 16 else []):
                got = short_attention(qkv, 12, v, block_s=block_s, num_warps=2 if block_s else None).float()
                assert (got - want).abs().max().item() < tol, (dtype, s, block_s, v is not None)


def test_kernel_failure_falls_back_to_sdpa_with_one_warning(monkeypatch: pytest.MonkeyPatch, break_kernel: Any) -> None:
    """A machine where Triton cannot build the kernel (no C compiler, say) still runs: SDPA's result, one warning."""
    import avex.attention as att
    import avex.kernel_fallback as kf

    break_kernel(att, "short_attention")
    blocks = _vit_blocks("vit_tiny_patch16_224")
    x = torch.randn(2, 5, 192)
    with torch.no_grad():
        want = blocks[1](blocks[0](x))
        with pytest.warns(RuntimeWarning, match="Triton attention kernel failed.*C compiler.*AVEX_SDPA"):
            got = att.block_forward(blocks[1], att.block_forward(blocks[0], x))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            att.block_forward(blocks[0], x)

    def refused(*args, **kwargs):
        raise ValueError("short_attention takes 1..64 tokens")

    monkeypatch.setattr(att, "short_attention", refused)
    monkeypatch.setattr(kf, "_kernel_failures", {})
    with torch.no_grad(), pytest.raises(ValueError, match="1..64 tokens"):  # a refusal is a bug: it is raised
        att.block_forward(blocks[0], x)
