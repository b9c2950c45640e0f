"""Attention and AME's attention entropy in one pass (avex/entropy_attention.py), and the decoder on it.

Tolerances (entropy in bits, summed over heads; against the materialised-map formula on the same inputs in
float32, or float64 where stated):

* entropy: 1e-4 absolute for fp32, fp16 and bf16 inputs (the kernel's products are exact in fp32; only the
  summation order differs); 2e-3 against float64 when every score shares an offset of ~1e4 (fp32's own
  rounding of such scores: the fp32 formula is off by as much);
* attention output: 1e-4 (fp32), 3e-3 (fp16), 2e-2 (bf16): the probabilities go into the P @ V product in
  the input's dtype, as in flash attention.

The kernel runs on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton is imported, hence
the subprocesses); its bf16 matmul is only right on a GPU, so bf16 is checked by the CUDA test.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from script_kit import assert_interpreted, interpreted

from avex.attention import short_attention_available
from avex.entropy_attention import entropy_attention, reference_entropy_attention

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def materialised(qkv: torch.Tensor, heads: int, first_query: int = 0, skip_keys: int = 1):
    """The formula the decoder used before the kernel: the whole [B, H, Q, S] map, then -p log2 p."""
    b, s, three_d = qkv.shape
    hd = three_d // (3 * heads)
    q, k, v = qkv.view(b, s, 3, heads, hd).permute(2, 0, 3, 1, 4)
    attn = ((q[:, :, first_query:] @ k.transpose(-2, -1)) * hd**-0.5).softmax(-1)
    p = attn[..., skip_keys:]
    ent = -(p * p.log2()).nan_to_num().sum(dim=(1, 3))  # AME: NaN (0 log 0) -> 0
    return (attn @ v).transpose(1, 2).reshape(b, s - first_query, heads * hd), ent


# ----------------------------------------------------------------------------- PyTorch reference (CPU)
def test_reference_equals_materialised_map_in_any_chunking() -> None:
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 37, 3 * 4 * 8, generator=gen) * 2
    want_out, want_ent = materialised(qkv, 4, first_query=1)
    for chunk in (1, 3 * 4 * 37 * 5, 1 << 24):  # one query row per chunk, five rows, everything at once
        out, ent = reference_entropy_attention(qkv, 4, first_query=1, chunk_elements=chunk)
        assert out is not None and ent is not None
        torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    assert want_ent.std() > 0.1  # a real map, not a constant
    none, ent_only = reference_entropy_attention(qkv, 4, first_query=1, output=False)
    assert none is None and torch.equal(ent_only, ent)
    out_only, none = reference_entropy_attention(qkv, 4, first_query=1, entropy=False)  # fused SDPA
    assert none is None
    torch.testing.assert_close(out_only, want_out, atol=1e-5, rtol=1e-5)


def test_reference_edge_cases_and_autograd() -> None:
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 9, 3 * 2 * 4, generator=gen)
    qkv[..., : 2 * 4] = 0  # q = 0: every score equal, p = 1/S; 8 of 9 keys summed, 2 heads
    _, ent = reference_entropy_attention(qkv, 2)
    torch.testing.assert_close(ent, torch.full((2, 9), 2 * 8 / 9 * math.log2(9)))
    _, one = reference_entropy_attention(qkv[:, :1], 2)  # a single key, CLS: nothing summed
    assert torch.equal(one, torch.zeros(2, 1))
    _, ent = reference_entropy_attention(qkv[:, :1], 2, skip_keys=0)  # p = 1: no uncertainty
    assert torch.equal(ent, torch.zeros(2, 1))
    _, ent = reference_entropy_attention(torch.randn(2, 9, 24, generator=gen) * 1e3, 2)  # one-hot rows: 0 log 0
    assert ent is not None and torch.isfinite(ent).all() and ent.max() < 1e-3
    qkv = torch.randn(2, 9, 24, generator=gen).requires_grad_()
    out, ent = reference_entropy_attention(qkv, 2, first_query=1)
    assert out is not None and ent is not None
    (out.sum() + ent.sum()).backward()  # the fallback keeps autograd
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all() and qkv.grad.abs().sum() > 0


def test_reference_reads_sequences_through_a_row_table_and_checks_it() -> None:
    """``rows``: a table of distinct rows and an index give what the gathered sequences give; an index out of the
    table's range is refused by the reference's indexing, a wrong dtype or shape by the argument check."""
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(12, 3 * 2 * 8, generator=gen) * 2
    index = torch.randint(0, 12, (3, 9), generator=gen)
    for dtype in (torch.int64, torch.int32):
        got = reference_entropy_attention(table, 2, first_query=1, rows=index.to(dtype))
        want = reference_entropy_attention(table[index], 2, first_query=1)
        assert all(g is not None and w is not None and torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(IndexError, match="index 12 is out of bounds for dimension 0 with size 12"):
        entropy_attention(table, 2, rows=torch.cat([index, torch.full((3, 1), 12)], dim=1))
    with pytest.raises(ValueError, match="rows must be int32/int64"):
        entropy_attention(table, 2, rows=index.float())
    with pytest.raises(ValueError, match=r"with rows, qkv must be a table \[R, 3\*H\*Dh\]"):
        entropy_attention(table[None], 2, rows=index)


def test_decoder_entropy_from_its_row_table_equals_the_whole_sequence_on_cpu() -> None:
    """A one-block decoder's entropy alone (norm and qkv per distinct row, read through an index) against the
    same block over the whole [B, 1 + N, dim] sequence (what decode(recon=True) runs), on the CPU."""
    from tests.test_model import sharp_decoder_case

    model, pix, coords = sharp_decoder_case(3, 4)
    assert model.decoder is not None and len(model.decoder.blocks) == 1
    with torch.no_grad():
        empty = model.aggregate_cache(model.init_cache(3, 4, 2, coords.shape[2]))  # nothing seen yet
        one, four = (model.forward_glimpses(pix[:, :t], coords[:, :t], 2) for t in (1, 4))
        for out in (empty, one, four):
            table = model.decode(out, recon=False)[1]
            whole = model.decode(out)[1]
            assert table is not None and whole is not None and whole.std() > 0.1
            torch.testing.assert_close(table, whole, atol=1e-5, rtol=1e-6)


def test_dispatch_on_cpu_runs_the_reference_and_checks_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import avex.entropy_attention as ea

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel must not run on CPU outside the interpreter")

    monkeypatch.setattr(ea, "entropy_attention_kernel", no_kernel)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qkv = torch.randn(2, 10, 3 * 2 * 16)
    with torch.no_grad():
        got = entropy_attention(qkv, 2, first_query=1)
    want = reference_entropy_attention(qkv, 2, first_query=1)
    assert all(torch.equal(g, w) for g, w in zip(got, want) if g is not None and w is not None)
    with pytest.raises(ValueError, match=r"first_query must be in 0\.\.10"):
        entropy_attention(qkv, 2, first_query=11)
    with pytest.raises(ValueError, match="output, the entropy or both"):
        entropy_attention(qkv, 2, output=False, entropy=False)
    with pytest.raises(ValueError, match=r"qkv must be \[B, S, 3\*H\*Dh\]"):
        entropy_attention(qkv, 5)


@needs_triton
def test_launch_table_keyed_by_shape_whatever_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A (S, Dh, dtype) entry of LAUNCHES replaces DEFAULT_LAUNCH for that shape only, at every batch (lowering BLOCK_M
    for small batches was slower: RESULTS.md 9.7); the interpreter takes BLOCK_M 16."""
    import avex.entropy_attention as ea
    import avex.kernel_fallback as kf

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(kf, "_sm_counts", {0: 100})
    monkeypatch.setattr(ea, "LAUNCHES", {(197, 32, torch.bfloat16): ea.Launch(128, 256, 8, 2)})
    assert ea._launch(197, 32, torch.float16, gpu) == ea.DEFAULT_LAUNCH
    assert ea._launch(197, 32, torch.bfloat16, gpu) == ea.Launch(128, 256, 8, 2)
    assert ea._launch(5, 32, torch.bfloat16, gpu) == ea.DEFAULT_LAUNCH
    assert ea._launch(197, 32, torch.bfloat16, torch.device("cpu")) == ea.Launch(16, 256, 8, 2)  # the interpreter
    with pytest.raises(ValueError, match="launch.block_n must be a power of two >= 16, got 24"):
        ea.entropy_attention_kernel(torch.randn(1, 5, 3 * 16), 1, launch=ea.Launch(16, 24, 4, 3))


@needs_triton
def test_blocks_cover_a_length_with_a_tail_no_larger_than_needed() -> None:
    """Full blocks, then one tail of the smallest power of two >= 16 that holds the rest: every length covered,
    never more than whole blocks would compute, the decoder's 196 queries and 197 keys in 208 rows at blocks of 64."""
    from avex.entropy_attention import _blocks

    assert _blocks(197, 64) == (3, 16) and _blocks(196, 64) == (3, 16) and _blocks(196, 128) == (1, 128)
    assert _blocks(32, 16) == (2, 0) and _blocks(5, 64) == (0, 16)
    for block in (16, 32, 64, 128, 256):
        for length in range(1, 600):
            full, tail = _blocks(length, block)
            covered = full * block + tail
            assert length <= covered <= -(-length // block) * block, (length, block, full, tail)
            assert tail == 0 or (16 <= tail <= block and tail & (tail - 1) == 0), (length, block, tail)
            assert tail == 0 or covered - length < max(16, tail // 2 + 1), (length, block, tail)  # the least pow2


# ------------------------------------------------------------------------------ the kernel (interpreter)
@needs_triton
def test_kernel_matches_the_map_under_interpreter() -> None:
    """fp32 and fp16; 1 to 70 keys (several key blocks, so the running max moves); every flag; block sizes;
    edge cases: all-equal scores, one key, one-hot rows, scores sharing an offset of ~1e4."""
    out = interpreted("""
        import math
        import torch
        from avex.entropy_attention import Launch, entropy_attention_kernel as kernel
        from tests.test_entropy_attention import materialised
        gen = torch.Generator().manual_seed(0)
        H, DH = 2, 16
        f32, f16 = torch.float32, torch.float16
        # Lengths that fill whole blocks of 16 and leave tails of keys and queries (every tail length, and tails
        # narrower than their block: test_kernel_covers_every_tail_under_interpreter); skipped keys beyond the first
        # block (skip 20).
        cases = ((f32, 1, 0, 1), (f32, 5, 1, 1), (f32, 17, 0, 0), (f32, 32, 0, 1), (f32, 70, 1, 1), (f16, 70, 3, 2),
                 (f32, 50, 2, 20))
        for dtype, s, fq, skip in cases:
            qkv = (torch.randn(2, s, 3 * H * DH, generator=gen) * 2).to(dtype)
            want_out, want_ent = materialised(qkv.float(), H, fq, skip)
            for launch in (Launch(16, 16, 2, 1), None):  # the defaults last: compared below
                o, e = kernel(qkv, H, first_query=fq, skip_keys=skip, launch=launch)
                assert o.dtype == dtype and o.shape == (2, s - fq, H * DH) and e.shape == (2, s - fq)
                err_o = (o.float() - want_out).abs().max().item()
                err_e = (e - want_ent).abs().max().item()
                tol = 1e-4 if dtype == f32 else 3e-3
                assert err_o < tol and err_e < 1e-4, (dtype, s, fq, skip, launch, err_o, err_e)
            none, e_only = kernel(qkv, H, first_query=fq, skip_keys=skip, output=False)
            o_only, none2 = kernel(qkv, H, first_query=fq, skip_keys=skip, entropy=False)
            assert none is None and none2 is None
            assert torch.equal(e_only, e) and torch.equal(o_only, o)  # same arithmetic whatever is asked
        qkv = torch.randn(2, 40, 3 * H * DH, generator=gen)
        qkv[..., : H * DH] = 0  # all-equal scores
        e = kernel(qkv, H, first_query=1, launch=Launch(16, 16, 4, 3))[1]
        assert (e - 2 * 39 / 40 * math.log2(40)).abs().max() < 1e-4, e
        assert kernel(qkv[:, :1], H)[1].eq(0).all() and kernel(qkv[:, :1], H, skip_keys=0)[1].eq(0).all()
        big = torch.randn(2, 40, 3 * H * DH, generator=gen) * 100  # one-hot rows
        o, e = kernel(big, H, first_query=1, launch=Launch(16, 16, 4, 3))
        want_out, want_ent = materialised(big, H, 1)
        assert torch.isfinite(e).all() and (e - want_ent).abs().max() < 1e-4 and (o - want_out).abs().max() < 1e-3
        shifted = torch.randn(2, 40, 3 * H * DH, generator=gen)
        shifted[..., H * DH : 2 * H * DH] += 3000 * torch.randn(1, 1, H * DH, generator=gen)  # scores ~1e4
        e = kernel(shifted, H, first_query=1, launch=Launch(16, 16, 4, 3))[1]
        want_ent = materialised(shifted.double(), H, 1)[1]
        assert want_ent.min() > 1 and (e - want_ent).abs().max() < 2e-3, (e - want_ent).abs().max()
        # Sequences read from a table of rows through an index (the decoder's shared mask rows), int64 and int32.
        table = torch.randn(30, 3 * H * DH, generator=gen) * 2
        index = torch.randint(0, 30, (3, 37), generator=gen)
        want_out, want_ent = materialised(table[index], H, 1)
        for rows in (index, index.int()):
            o, e = kernel(table, H, first_query=1, rows=rows, launch=Launch(16, 16, 4, 3))
            assert o.shape == (3, 36, H * DH) and e.shape == (3, 36)
            assert (o - want_out).abs().max() < 1e-4 and (e - want_ent).abs().max() < 1e-4
        print("ok")
    """)
    assert out.strip() == "ok"


# (query rows per block, keys per block) -> (S, first_query) cases, chosen for the blocks' paths (_blocks): at 16 x 16,
# every key tail of 1 to 15 keys, alone (S < 16) and after full blocks, and query rows that fill whole blocks (16, 32:
# no tail program); at 32 x 64 and 64 x 32, tails smaller than their block (16 and 32 rows or keys, with and
# without full blocks before them), tails as wide as the block, and sequences shorter than one block.
TAIL_CASES = {
    (16, 16): [(s, s % 2 if s > 1 else 0) for s in range(1, 34)],
    (32, 64): [(1, 0), (9, 1), (16, 0), (24, 3), (33, 1), (47, 0), (64, 0), (65, 1), (81, 0), (97, 1), (100, 4),
               (128, 0), (130, 1)],
    (64, 32): [(5, 0), (20, 4), (32, 0), (40, 0), (49, 1), (64, 0), (65, 1), (80, 0), (100, 3), (129, 1)],
}  # fmt: skip


def check_tails(block_m: int, block_n: int) -> None:
    """The kernel at blocks block_m x block_n equals the materialised map on every case of TAIL_CASES, read whole
    and through a row table; skip_keys 0, 1, 2 and 17 (a skipped key in a later block, full or tail)."""
    from avex.entropy_attention import Launch, _blocks, entropy_attention_kernel

    gen = torch.Generator().manual_seed(block_m + block_n)
    heads, dh = 2, 16
    launch = Launch(block_m, block_n, 4, 3)
    for s, fq in TAIL_CASES[block_m, block_n]:
        skip = (1, 0, 2, 17)[s % 4]
        table = torch.randn(3 * s, 3 * heads * dh, generator=gen) * 2
        index = torch.randperm(3 * s, generator=gen)[: 2 * s].view(2, s)
        qkv = table[index]
        want_out, want_ent = materialised(qkv, heads, fq, skip)
        for o, e in (
            entropy_attention_kernel(qkv, heads, first_query=fq, skip_keys=skip, launch=launch),
            entropy_attention_kernel(table, heads, first_query=fq, skip_keys=skip, rows=index, launch=launch),
        ):
            err_o = (o - want_out).abs().max().item()
            err_e = (e - want_ent).abs().max().item()
            paths = (_blocks(s, block_n), _blocks(s - fq, block_m))  # (full, tail) keys and queries
            assert err_o < 1e-4 and err_e < 1e-4, (s, fq, skip, paths, err_o, err_e)


@needs_triton
@pytest.mark.parametrize(("block_m", "block_n"), list(TAIL_CASES))
def test_kernel_covers_every_tail_under_interpreter(block_m: int, block_n: int) -> None:
    """Key tails of 1 to 15 keys, query tails narrower than their block, query rows in whole blocks (no tail
    program), sequences shorter than one block: each equals the materialised map."""
    assert_interpreted("tests.test_entropy_attention", f"check_tails({block_m}, {block_n})")


@needs_triton
def test_decoder_uses_the_kernel_and_keeps_its_entropy_map() -> None:
    """decode(recon=False) goes through the kernel (under the interpreter) and gives the PyTorch path's map
    and reconstruction; AVEX_ENTROPY_KERNEL=0 turns it off."""
    out = interpreted("""
        import os
        import numpy as np
        import torch
        import avex.entropy_attention as ea
        from tests.test_model import sharp_decoder_case
        model, pix, coords = sharp_decoder_case(2, 3, decoder_depth=2)
        calls = []
        kernel = ea.entropy_attention_kernel
        ea.entropy_attention_kernel = lambda *a, **k: calls.append(1) or kernel(*a, **k)
        with torch.no_grad():
            out = model.forward_glimpses(pix, coords, 2)
            _, ent = model.decode(out, recon=False)
            recon, ent_both = model.decode(out)
            assert len(calls) == 2, calls  # the last block only: earlier blocks need no entropy
            os.environ["AVEX_ENTROPY_KERNEL"] = "0"
            recon_ref, ent_ref = model.decode(out)
            assert len(calls) == 2
        assert torch.equal(ent, ent_both)
        assert (ent - ent_ref).abs().max() < 1e-4 and ent_ref.std() > 0.02, ((ent - ent_ref).abs().max(), ent_ref.std())
        assert (recon - recon_ref).abs().max() < 1e-4
        # A one-block decoder's entropy alone reads its row table through an index (the kernel's rows argument).
        model = sharp_decoder_case(2, 3)[0]
        with torch.no_grad():
            out = model.forward_glimpses(pix, coords, 2)
            seen = []
            ea.entropy_attention_kernel = lambda *a, **k: seen.append(k.get("rows") is not None) or kernel(*a, **k)
            os.environ["AVEX_ENTROPY_KERNEL"] = "1"
            _, ent = model.decode(out, recon=False)
            _, ent_whole = model.decode(out)
            assert seen == [True, False], seen
        assert (ent - ent_whole).abs().max() < 1e-4 and ent.std() > 0.02
        print("ok")
    """)
    assert out.strip() == "ok"


# -------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available() or not short_attention_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_matches_the_map_on_cuda(dtype: torch.dtype) -> None:
    """The decoder's shapes (4 heads of 32, 1 + N tokens up to N = 28 x 28) and a ViT-B-like head width."""
    from avex.entropy_attention import entropy_attention_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}[dtype]
    for b, s, heads, hd in ((1, 50, 4, 32), (64, 197, 4, 32), (16, 785, 4, 32), (8, 197, 12, 64)):
        qkv = (torch.randn(b, s, 3 * heads * hd, device="cuda", generator=gen) * 1.5).to(dtype)
        want_out, want_ent = materialised(qkv.float(), heads, 1)
        out, ent = entropy_attention_kernel(qkv, heads, first_query=1)
        assert out is not None and ent is not None
        err_o, err_e = (out.float() - want_out).abs().max().item(), (ent - want_ent).abs().max().item()
        assert err_o < tol and err_e < 1e-4, (b, s, heads, hd, err_o, err_e)
        _, ent_only = entropy_attention_kernel(qkv, heads, first_query=1, output=False)
        torch.testing.assert_close(ent_only, ent, atol=1e-5, rtol=1e-6)  # other code, other rounding
        # The same sequences read from a table through an index: the decoder's mask rows, shared by every row.
        table = qkv.view(b * s, -1)
        rows = torch.arange(b * s, device="cuda").view(b, s)
        rows[:, s // 2 :] = rows[0, s // 2 :].clone()  # the second half of every sequence: row 0's rows
        want_out, want_ent = materialised(table[rows].float(), heads, 1)
        out, ent = entropy_attention_kernel(table, heads, first_query=1, rows=rows.int())
        assert out is not None and ent is not None
        err_o, err_e = (out.float() - want_out).abs().max().item(), (ent - want_ent).abs().max().item()
        assert err_o < tol and err_e < 1e-4, ("rows", b, s, heads, hd, err_o, err_e)


@pytest.mark.skipif(not torch.cuda.is_available() or not short_attention_available(), reason="needs CUDA and Triton")
def test_kernel_takes_more_rows_than_a_grid_axis_on_cuda() -> None:
    """A vector env of 65,536 envs and more: the batch lies on the launch grid's first axis (CUDA limits the
    others to 65,535 programs), so the kernel runs rather than failing over to PyTorch."""
    from avex.entropy_attention import entropy_attention_kernel

    qkv = torch.randn(70_000, 5, 3 * 16, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    want_out, want_ent = materialised(qkv, 1, 1)
    out, ent = entropy_attention_kernel(qkv, 1, first_query=1)
    assert out is not None and ent is not None
    assert (out - want_out).abs().max().item() < 1e-4 and (ent - want_ent).abs().max().item() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available() or not short_attention_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoder_on_cuda_keeps_the_entropy_map(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The env's entropy map on CUDA (the kernel) against the PyTorch path on the same GPU model (the map the
    decoder gave before the kernel) and against the CPU's (float32, as shipped). fp32: 1e-4 and 1e-3 bits.
    bf16: the PyTorch path rounds the scores to bf16 and the kernel does not (its products accumulate in
    fp32), so they differ by up to 0.25 bits (maps of ~18 to 21 bits); the whole bf16 model is 0.5 bits from
    the CPU's map."""
    from tests.test_model import sharp_decoder_case

    model, pix, coords = sharp_decoder_case(4, 5)
    with torch.no_grad():
        cpu = model.decode(model.forward_glimpses(pix, coords, 2), recon=False)[1]
        gpu = model.to("cuda", dtype)
        out = gpu.forward_glimpses(pix.cuda(), coords.cuda(), 2)
        got = gpu.decode(out, recon=False)[1]
        monkeypatch.setenv("AVEX_ENTROPY_KERNEL", "0")
        before = gpu.decode(out, recon=False)[1]
    assert got is not None and before is not None and cpu is not None and got.dtype == torch.float32
    assert cpu.std() > 0.5
    err_before, err_cpu = (got - before).abs().max().item(), (got.cpu() - cpu).abs().max().item()
    fp32 = dtype == torch.float32
    assert err_before < (1e-4 if fp32 else 0.25) and err_cpu < (1e-3 if fp32 else 0.5), (err_before, err_cpu)
