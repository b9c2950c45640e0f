"""The decoder's sequence index (avex/decoder_index.py): each observed token's cell, each sequence token's table row;
the Triton kernel equals the PyTorch reference exactly (integers), under Triton's interpreter and on CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from script_kit import assert_interpreted

from avex.decoder_index import reference_sequence_index, sequence_index

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def cases(device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]]:
    """Random coordinates with exact ties (x.5, which torch.round takes to the even neighbour), some off the grid,
    tokens that share cells; with and without padding; the empty pass; a 28 x 28 grid of more than one block."""
    gen = torch.Generator().manual_seed(0)
    out: list[tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]] = []
    for b, n_obs, grid in ((3, 7, (4, 5)), (2, 48, (14, 14)), (2, 0, (3, 3)), (1, 130, (28, 28))):
        coords = torch.rand(b, n_obs, 2, generator=gen) * (grid[0] + 2) - 1
        half = n_obs // 2
        coords[:, :half] = coords[:, :half].round() + 0.5 * (torch.rand(b, half, 2, generator=gen) < 0.5)
        for valid in (None, torch.rand(b, n_obs, generator=gen) < 0.7):
            out.append((coords.to(device), None if valid is None else valid.to(device), grid))
    return out


def kernel_equals_reference(device: str) -> None:
    """The kernel's cells and index equal the reference's in every case (under the interpreter and on CUDA)."""
    from avex.decoder_index import sequence_index_kernel

    for coords, valid, grid in cases(device):
        got, want = sequence_index_kernel(coords, valid, grid), reference_sequence_index(coords, valid, grid)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (tuple(coords.shape), grid)


def test_reference_index_by_hand() -> None:
    """Two rows of three tokens on a 2 x 3 grid: the latest valid token of a cell wins, ties round to even, off-grid
    coordinates clamp; unseen cells read the mask rows after the B CLS rows and the B * L token rows."""
    coords = torch.tensor([[[0.0, 0.0], [0.5, 2.6], [0.0, 0.2]], [[1.5, 1.0], [9.0, -3.0], [1.0, 1.0]]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    cell, index = reference_sequence_index(coords, valid, (2, 3))
    assert cell.tolist() == [[0, 2, 0], [4, 3, 4]]  # 0.5 -> 0 and 1.5 -> 2 -> clamped to row 1; (9, -3) -> (1, 0)
    b, n_obs, mask = 2, 3, 2 + 2 * 3  # the mask rows start after the CLS and token rows
    assert index[0].tolist() == [0, b + 2, mask + 1, b + 1, mask + 3, mask + 4, mask + 5]  # token 2 replaced token 0
    # Row 1's token 2 is padding: cell 4 keeps token 0.
    assert index[1].tolist() == [1, mask, mask + 1, mask + 2, b + n_obs + 1, b + n_obs + 0, mask + 5]


def test_dispatch_on_cpu_is_the_reference_and_checks_arguments() -> None:
    for coords, valid, grid in cases():
        got, want = sequence_index(coords, valid, grid), reference_sequence_index(coords, valid, grid)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match=r"coords must be float \[B, L, 2\]"):
        sequence_index(torch.zeros(2, 3, 2, dtype=torch.long), None, (3, 3))
    with pytest.raises(ValueError, match=r"valid must be bool \[B, L\] = \[2, 3\]"):
        sequence_index(torch.zeros(2, 3, 2), torch.ones(2, 4, dtype=torch.bool), (3, 3))
    with pytest.raises(ValueError, match=r"grid must be \(rows, cols\) >= 1"):
        sequence_index(torch.zeros(2, 3, 2), None, (0, 3))


@needs_triton
def test_kernel_equals_the_reference_under_interpreter() -> None:
    assert_interpreted("tests.test_decoder_index", 'kernel_equals_reference("cpu")')


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA")
def test_kernel_equals_the_reference_on_cuda() -> None:
    from avex.decoder_index import sequence_index_kernel

    kernel_equals_reference("cuda")
    big = torch.rand(70_000, 48, 2, device="cuda") * 14  # more rows than a grid axis beyond the first takes
    got, want = sequence_index_kernel(big, None, (14, 14)), reference_sequence_index(big, None, (14, 14))
    assert torch.equal(got[1], want[1])
