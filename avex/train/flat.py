"""Every weight of the fused step in one compute-dtype copy, every gradient back in one fp32 buffer.

:func:`cast_params` is the first operation of :class:`~avex.train.fused.FusedObjective`'s forward and so the
last of its backward: there, the gradients of all parameters arrive together, and one flat fp32 buffer holds
them before autograd hands its views to the parameters. That buffer is where a multi-process run averages its
gradients (``reduce``, :func:`avex.train.allreduce.average_gradients`): one collective over every gradient,
which a CUDA graph of the whole step can capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["GradReduce", "cast_params"]

GradReduce = Callable[[torch.Tensor], None]  # in place on the flat fp32 gradient [n]
_ALIGN = 64  # elements: every cast parameter starts 128 bytes apart (vectorised kernels need aligned pointers)


def _padded(tensors: Sequence[torch.Tensor], shapes: list[torch.Size]) -> list[torch.Tensor]:
    """The tensors flattened, each followed by zeros up to a multiple of :data:`_ALIGN` elements."""
    zeros = tensors[0].new_zeros(_ALIGN)
    parts = []
    for t, shape in zip(tensors, shapes):
        parts.append(t.reshape(-1))
        if shape.numel() % _ALIGN:
            parts.append(zeros[: -shape.numel() % _ALIGN])
    return parts


def _unpadded(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Views of ``flat`` (as :func:`_padded` laid it out) in the given shapes."""
    views, at = [], 0
    for shape in shapes:
        views.append(flat[at : at + shape.numel()].view(shape))
        at += -(-shape.numel() // _ALIGN) * _ALIGN
    return views


class _CastParams(torch.autograd.Function):
    """See :func:`cast_params`. The gradient of a parameter a step does not use arrives as zeros (autograd
    materialises it), as the eager step gives it for a decoder whose loss term is zero."""

    @staticmethod
    def forward(
        ctx: Any, dtype: torch.dtype, reduce: GradReduce | None, *params: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.shapes = [p.shape for p in params]
        ctx.param_dtype, ctx.reduce = params[0].dtype, reduce
        return tuple(_unpadded(torch.cat(_padded(params, ctx.shapes)).to(dtype), ctx.shapes))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        flat = torch.cat(_padded(grads, ctx.shapes)).to(ctx.param_dtype)
        views = _unpadded(flat, ctx.shapes)
        if ctx.reduce is not None:
            ctx.reduce(flat)
        return (None, None, *views)


def cast_params(
    params: Sequence[torch.Tensor], dtype: torch.dtype, reduce: GradReduce | None = None
) -> list[torch.Tensor]:
    """Every parameter in ``dtype``, in one copy; backward: every gradient in the parameters' dtype, in one copy.

    The copies live in one flat buffer in which each tensor starts at a multiple of :data:`_ALIGN` elements
    (a layer norm's vectorised kernel, for one, needs its weights aligned); so do the gradients.

    Args:
        params: the parameters (one dtype, fp32 in training).
        reduce: called in place on the flat gradient [total padded elements] once it holds every gradient,
            before the parameters get their views of it (e.g. the average over processes).

    Returns:
        the cast copies, in the parameters' order.
    """
    return list(_CastParams.apply(dtype, reduce, *params))
