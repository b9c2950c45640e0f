"""Data parallelism for the fused step: DDP's arithmetic on one flat gradient buffer, inside the step.

DDP wraps a module and averages its gradients bucket by bucket from autograd hooks, outside anything a CUDA
graph could hold. The fused step (:class:`~avex.train.fused.FusedObjective`) already gathers every gradient in
one fp32 buffer at the end of its backward (:func:`~avex.train.flat.cast_params`); :func:`average_gradients`
averages that buffer over the processes with one ``all_reduce``, in place, before the parameters get their
views of it. Clipping and AdamW then run on the averaged gradients as on one process, and the whole step,
collective included, is one CUDA graph per (K, T) (:class:`~avex.train.step.GraphedStep`; NCCL collectives
can be captured: every rank captures the same graphs in the same order, since the (K, T) of a step is drawn
for the global batch from (seed, step)). On the CPU the same code runs eagerly over gloo.

:func:`broadcast_state` is DDP's start: every rank takes rank 0's parameters and buffers.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["average_gradients", "broadcast_state"]


def average_gradients(flat: torch.Tensor) -> None:
    """In place: the flat gradient [n] of this process -> its mean over the default group's processes.

    DDP's arithmetic (its default communication hook): each process's gradient divided by the number of
    processes, then summed over them by one ``all_reduce``, in the gradient's dtype (fp32 here).
    """
    flat.div_(dist.get_world_size())
    dist.all_reduce(flat)


@torch.no_grad()
def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Every process takes process ``src``'s parameters and buffers of ``module`` (as DDP does when it wraps one)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        dist.broadcast(t, src)
