"""A step's small writes in one pass (avex/step_writes.py): the placed tokens and the cache's new slots equal
PyTorch's ops (the CPU path) under Triton's interpreter and on CUDA, for every prefix layout and in steps of an
episode (the running mean's lerp weight below and above 0.5)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from script_kit import assert_interpreted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def placed_equals_ops(device: str) -> None:
    """Every prefix layout (CLS with its position, registers, no prefix position), fp32 and bf16: the kernel's
    iterator input equals the ops' bit for bit (each sum rounded once in both; under the interpreter bf16 within its
    rounding); a token takes its own cell's position."""
    from avex.posembed import lookup_pos_embed
    from avex.step_writes import place_tokens
    from tests.test_model import VARIANTS, G, make

    gen = torch.Generator().manual_seed(0)
    for variant in VARIANTS:
        for dtype in (torch.float32, torch.bfloat16):
            model = make(variant).to(device, dtype)
            b, d = 3, model.embed_dim
            x = torch.randn(b, G * G, d, generator=gen).to(device, dtype)
            coords = torch.randint(0, model.grid[0], (b, G * G, 2), generator=gen).to(device)
            with torch.no_grad():
                want = model._place_by_ops(x, lookup_pos_embed(model._patch_pos_table(), model.grid, coords))
                got = model._place_tokens(x, coords)
            assert got.shape == want.shape
            if dtype == torch.float32 or device == "cuda":
                assert torch.equal(got, want), (variant, dtype)
            else:  # Triton's interpreter rounds fp32 to bf16 toward zero, not to nearest: one bf16 step apart
                assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7).all(), variant
    # Without the table's lookup a token gets another cell's position: the kernel must fail then.
    model = make().to(device)
    x = torch.randn(2, 4, model.embed_dim, generator=gen).to(device)
    coords = torch.tensor([[[0, 1], [1, 0], [2, 3], [7, 7]]] * 2, device=device)
    vit = model.vit
    table = model._patch_pos_table()
    got = place_tokens(x, coords, table, vit.cls_token[0], vit.pos_embed[0, :1], model.grid[1])
    assert torch.equal(got[:, 1 + 3], x[:, 3] + table[7 * model.grid[1] + 7])
    assert torch.equal(got[:, 0], (vit.cls_token[0, 0] + vit.pos_embed[0, 0]).expand(2, -1))


def appended_equals_ops(device: str) -> None:
    """Twelve glimpses, each into two caches that hold the same state, one by the kernel, one by the ops (fp32 and
    bf16, one and five prefix rows): the same tokens and coordinates, and the running means within one rounding of
    the same lerp (weights 1 to 1/12: both of lerp's forms; a fused multiply-add or not; Triton's interpreter rounds
    to bf16 toward zero)."""
    import avex.layer_norm

    min_rows, avex.layer_norm.MIN_ROWS = avex.layer_norm.MIN_ROWS, 1  # few rows take the kernel, as in a graph
    try:
        _append_both_ways(device)
    finally:
        avex.layer_norm.MIN_ROWS = min_rows


def _append_both_ways(device: str) -> None:
    """:func:`appended_equals_ops`' check, with the kernel taking any row count."""
    import avex.cache as cache_mod
    from avex.cache import TokenCache

    gen = torch.Generator().manual_seed(1)
    may_run = cache_mod._kernel_may_run
    for dtype, p in ((torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 5)):
        b, g, d, cap = 3, 4, 24, 12
        ulp = 2**-20 if dtype == torch.float32 else 2**-7  # a few roundings of fp32; one of bf16
        a, o = (
            TokenCache(
                torch.zeros(b, p + cap * g, d, dtype=dtype, device=device),
                torch.zeros(b, cap * g, 2, device=device),
                torch.zeros(b, dtype=int),
                2,
                g,
                p,
            )
            for _ in range(2)
        )
        for _ in range(cap):
            x = (torch.randn(b, p + g, d, generator=gen) * 3).to(device, dtype)
            coords = torch.randint(0, 9, (b, g, 2), generator=gen).to(device)
            o.buf.copy_(a.buf)
            with torch.no_grad():
                a.append(x, coords)
                cache_mod._kernel_may_run = lambda t: False  # the ops, as on the CPU
                try:
                    o.append(x, coords)
                finally:
                    cache_mod._kernel_may_run = may_run
            assert torch.equal(a.buf[:, p:], o.buf[:, p:]) and torch.equal(a.coords, o.coords), (dtype, p)
            err = (a.buf[:, :p].float() - o.buf[:, :p].float()).abs() / o.buf[:, :p].float().abs().clamp(min=2**-6)
            assert err.max() <= ulp, (dtype, p, a.counts, err.max())
        assert a.buf[:, :p].abs().max() > 0.1 and a.counts.tolist() == o.counts.tolist() == [cap] * b


def few_rows_keep_the_ops() -> None:
    """A model step on few rows from eager Python keeps PyTorch's ops (a Triton launch costs more host time than
    they do: avex.layer_norm.launch_pays); with the rows' threshold lifted, as inside a captured graph, both writes
    take their kernel."""
    import avex.cache
    import avex.embedding
    import avex.layer_norm
    from tests.test_model import run_sequential, sharp_decoder_case

    model, pix, coords = sharp_decoder_case(2, 3)
    calls: list[str] = []
    place, append = avex.embedding.place_tokens, avex.cache.append_glimpse
    avex.embedding.place_tokens = lambda *a: calls.append("place") or place(*a)  # type: ignore[assignment]
    avex.cache.append_glimpse = lambda *a: calls.append("append") or append(*a)  # type: ignore[assignment]
    with torch.no_grad():
        _, few = run_sequential(model, pix, coords, 2)
        assert calls == [], calls
        avex.layer_norm.MIN_ROWS = 1
        _, lifted = run_sequential(model, pix, coords, 2)
    assert calls.count("place") == calls.count("append") == 3, calls  # one of each per glimpse
    assert all((a.logits - b.logits).abs().max() < 1e-4 for a, b in zip(few, lifted))


@needs_triton
def test_few_rows_keep_the_ops_under_interpreter() -> None:
    assert_interpreted("tests.test_step_writes", "few_rows_keep_the_ops()")


@needs_triton
def test_placed_tokens_equal_the_ops_under_interpreter() -> None:
    assert_interpreted("tests.test_step_writes", 'placed_equals_ops("cpu")')


@needs_triton
def test_appended_glimpses_equal_the_ops_under_interpreter() -> None:
    assert_interpreted("tests.test_step_writes", 'appended_equals_ops("cpu")')


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA")
def test_step_writes_equal_the_ops_on_cuda() -> None:
    placed_equals_ops("cuda")
    appended_equals_ops("cuda")
