"""The decoder's normed table (avex/decoder_table.py): the Triton kernel against PyTorch's ops, under Triton's
interpreter and on CUDA, and the decoder's entropy map through it against the decoder's PyTorch path."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn
from script_kit import assert_interpreted

from avex.decoder_index import reference_sequence_index
from avex.decoder_table import normed_table, reference_normed_table

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


Case = tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]  # (emb, prefix, cell, pos, mask)


def cases(device: str, dtype: torch.dtype) -> list[Case]:
    """Several sequences of observed tokens (cells shared, none seen: the empty pass), one and two prefix tokens, a
    width that is not a power of two, a 28 x 28 grid."""
    gen = torch.Generator().manual_seed(0)
    out: list[Case] = []
    for b, prefix, n_obs, n, d in ((3, 1, 7, 20, 16), (2, 2, 48, 196, 128), (4, 1, 0, 9, 24), (1, 1, 130, 784, 128)):
        emb = torch.randn(b, prefix + n_obs, d, generator=gen) * 3
        cell = torch.randint(0, n, (b, n_obs), generator=gen)
        pos, mask = torch.randn(n, d, generator=gen), torch.randn(d, generator=gen)
        out.append((emb.to(device, dtype), prefix, cell.to(device), pos.to(device, dtype), mask.to(device, dtype)))
    return out


def norm(d: int, device: str, dtype: torch.dtype) -> nn.LayerNorm:
    ln = nn.LayerNorm(d, eps=1e-6).to(device, dtype)
    with torch.no_grad():
        ln.weight.copy_(torch.linspace(0.5, 1.5, d))
        ln.bias.copy_(torch.linspace(-0.2, 0.3, d))
    return ln


def kernel_equals_reference(device: str) -> None:
    """Every case and dtype: the kernel's table equals the reference's (fp32 within 1e-5; fp16/bf16 within one
    rounding of the output, since both round each sum to the dtype once and norm in fp32)."""
    from avex.decoder_table import normed_table_kernel

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)):
        for emb, prefix, cell, pos, mask in cases(device, dtype):
            ln = norm(emb.shape[-1], device, dtype)
            with torch.no_grad():
                got = normed_table_kernel(emb, prefix, cell, pos, mask, ln)
                want = reference_normed_table(emb, prefix, cell, pos, mask, ln)
            assert got.shape == want.shape == (emb.shape[0] * (emb.shape[1] - prefix + 1) + pos.shape[0], emb.shape[2])
            err = ((got.float() - want.float()).abs() / (1 + want.float().abs())).max().item()
            assert err < tol, (dtype, tuple(emb.shape), prefix, err)


def test_reference_rows_by_hand() -> None:
    """Two sequences of P = 2 prefix tokens and two observed tokens, N = 3 cells, an identity-like norm (width 2:
    each row's norm is +-1): CLS rows first (the register is not read), then each token plus its cell's position,
    then the mask token plus each position."""
    emb = torch.tensor([[[1.0, 0.0], [9.0, 9.0], [0.0, 2.0], [5.0, 1.0]], [[0.0, 3.0], [9.0, 9.0], [4, 0], [0, 0]]])
    cell = torch.tensor([[2, 0], [1, 1]])
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    mask = torch.tensor([0.0, 5.0])
    ln = nn.LayerNorm(2, eps=0.0)
    got = reference_normed_table(emb, 2, cell, pos, mask, ln)
    # rows: CLS 0, CLS 1, (3, 2), (6, 1), (4, 1), (0, 1), (1, 5), (0, 6), (3, 5)
    sign = [1, -1, 1, 1, 1, -1, -1, -1, -1]
    assert got.detach().tolist() == [[s, -s] for s in sign]


def test_dispatch_on_cpu_is_the_reference_and_checks_arguments() -> None:
    emb, prefix, cell, pos, mask = cases("cpu", torch.float32)[0]
    ln = norm(emb.shape[-1], "cpu", torch.float32)
    with torch.no_grad():
        want = reference_normed_table(emb, prefix, cell, pos, mask, ln)
        assert torch.equal(normed_table(emb, prefix, cell, pos, mask, ln), want)
    with pytest.raises(ValueError, match=r"emb must be \[B, S, d\] with 1 <= prefix <= S"):
        normed_table(emb, 0, cell, pos, mask, ln)
    with pytest.raises(ValueError, match=r"cell must be int64 \[B, L\] = \[3, 7\]"):
        normed_table(emb, prefix, cell[:, :3], pos, mask, ln)
    with pytest.raises(ValueError, match=r"pos must be \[N, 16\] and mask \[16\]"):
        normed_table(emb, prefix, cell, pos[:, :8], mask, ln)


def decoder_kernel_path_equals_cpu_path() -> None:
    """The decoder's entropy map where the kernels may run (one product over the sequence, the normed table by the
    kernel: forced by a CUDA graph's rule) equals the CPU path's (two products, PyTorch's ops) within 1e-4 bits."""
    import avex.decoder_table as dt
    import avex.layer_norm as lnm
    from tests.test_model import sharp_decoder_case

    model, pix, coords = sharp_decoder_case(3, 4)
    calls = []
    kernel = dt.normed_table_kernel
    dt.normed_table_kernel = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    with torch.no_grad():
        out = model.forward_glimpses(pix, coords, 2)
        lnm.MIN_ROWS = 1  # the few rows of this test take the kernels, as in a captured graph
        _, got = model.decode(out, recon=False)
        assert calls == [1], calls
        _, want = model.decode(out)  # reconstruction too: the sequence path, no table
    assert (got - want).abs().max() < 1e-4 and want.std() > 0.02, ((got - want).abs().max(), want.std())


@needs_triton
def test_kernel_equals_the_reference_under_interpreter() -> None:
    assert_interpreted("tests.test_decoder_table", 'kernel_equals_reference("cpu")')


@needs_triton
def test_decoder_takes_the_kernel_under_interpreter() -> None:
    assert_interpreted("tests.test_decoder_table", "decoder_kernel_path_equals_cpu_path()")


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA")
def test_kernel_equals_the_reference_on_cuda() -> None:
    kernel_equals_reference("cuda")


def test_sequence_index_layout_is_the_tables() -> None:
    """The index the entropy kernel reads points into this table's rows: a token's row holds its embedding plus its
    cell's position, an unseen cell's row the mask token plus its position."""
    gen = torch.Generator().manual_seed(1)
    b, prefix, n_obs, grid, d = 2, 1, 5, (3, 3), 8
    coords = torch.randint(0, 3, (b, n_obs, 2), generator=gen).float()
    cell, index = reference_sequence_index(coords, None, grid)
    emb = torch.randn(b, prefix + n_obs, d, generator=gen)
    pos, mask = torch.randn(9, d, generator=gen), torch.randn(d, generator=gen)
    ident = nn.LayerNorm(d, eps=0.0, elementwise_affine=False)
    table = reference_normed_table(emb, prefix, cell, pos, mask, ident)
    for row in range(b):
        seq = table[index[row]]
        assert torch.allclose(seq[0], ident(emb[row, 0]))
        for c in range(9):
            held = [t for t in range(n_obs) if cell[row, t] == c]
            want = emb[row, prefix + held[-1]] + pos[c] if held else mask + pos[c]
            assert torch.allclose(seq[1 + c], ident(want), atol=1e-6)
