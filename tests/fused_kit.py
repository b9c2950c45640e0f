"""Shared pieces of the fused-step tests (tests/test_train_step.py, tests/test_train_fused_ls.py): a random batch of
TORE's policy, one objective's loss and gradients, and the fused objective checked against the eager one at every K."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from avex.train import FusedObjective, TOREObjective, sample_glimpses

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def random_batch(model: Any, batch: int, T: int, glimpse: int = 2, seed: int = 1, device: str = "cpu") -> Batch:
    """Random uint8 canvases [batch, H, H, C], labels [batch] and T non-overlapping glimpses per row."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, c = model.img_size[0], model.in_chans
    canvases = torch.randint(0, 256, (batch, h, h, c), dtype=torch.uint8, generator=gen, device=device)
    labels = torch.randint(0, 10, (batch,), generator=gen, device=device)
    rows, cols = sample_glimpses(model.geometry(glimpse), batch, T, gen)
    return canvases, labels, rows, cols


def loss_and_grads(
    objective: Any, model: Any, batch: Batch, K: int
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The objective's outputs (loss first, detached) and every parameter gradient it gives, from zero."""
    model.zero_grad(set_to_none=True)
    out = objective(*batch, K)
    out[0].backward()
    return [t.detach() for t in out], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def fused_equals_eager(
    model: Any, batch: Batch, recon: float, grad_atol: float = 1e-6
) -> Iterator[tuple[int, list[torch.Tensor], dict[str, torch.Tensor]]]:
    """For every K: assert the fused objective's outputs and gradients equal the eager one's (fp32 tolerances:
    outputs 1e-5 relative / 2e-6 absolute, gradients 1e-4 / ``grad_atol`` plus 2e-6 of the tensor's largest entry), the
    same parameters getting gradients;
    then yield (K, the eager outputs, the eager gradients) for the caller's own checks."""
    geo = model.geometry(2)
    eager = TOREObjective(model, geo, recon, label_smoothing=0.1)
    fused = FusedObjective(model, geo, recon, label_smoothing=0.1)
    for K in range(model.depth + 1):
        want, want_grads = loss_and_grads(eager, model, batch, K)
        got, got_grads = loss_and_grads(fused, model, batch, K)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
        assert got_grads.keys() == want_grads.keys()  # the same parameters get gradients (zeros included)
        for name, g in want_grads.items():
            # plus 2e-6 of the tensor's largest entry: a sum over every row of the batch (a register token's, a
            # position's) rounds differently with the order, which differs between CPUs' matrix kernels
            atol = grad_atol + 2e-6 * float(g.abs().max())
            torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=atol, msg=f"K={K} {name}")
        yield K, want, want_grads
