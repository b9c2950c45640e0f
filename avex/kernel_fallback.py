"""Where avex's Triton kernels may run, and PyTorch's ops in their place where a kernel cannot build or launch.

Every inference kernel (:mod:`avex.attention`, :mod:`avex.entropy_attention`, :mod:`avex.layer_norm`) asks the
same two questions: may a kernel run on this tensor (:func:`_kernel_may_run`: Triton importable, no autograd,
CUDA or Triton's CPU interpreter), and what runs once it has failed on this machine (:func:`kernel_or_fallback`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

try:  # Triton ships with PyTorch's CUDA wheels; CPU-only installs simply never use the kernels.
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["kernel_or_fallback", "triton"]

_T = TypeVar("_T")


def _interpreted() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1`` before import) runs the kernels on CPU tensors: tests use it."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device_may_run(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``x``'s device: Triton present, and CUDA or Triton's interpreter."""
    return triton is not None and (x.is_cuda or _interpreted())


def _kernel_may_run(x: torch.Tensor) -> bool:
    """Whether an inference kernel can run on ``x``'s device and mode: :func:`_device_may_run`, no autograd."""
    return not torch.is_grad_enabled() and _device_may_run(x)


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int | None:
    """The streaming multiprocessors of a CUDA device (cached), or None elsewhere (Triton's interpreter): launch
    settings that size a grid to fill the GPU read it."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_counts:
        _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_counts[idx]


# Why a Triton kernel could not build or launch on this machine, by kernel name: set on its first failure.
_kernel_failures: dict[str, str] = {}


def kernel_or_fallback(name: str, kernel: Callable[[], _T], fallback: Callable[[], _T], advice: str) -> _T:
    """``kernel()``, or ``fallback()`` (with one warning per kernel name) once the kernel has failed to build or
    launch here: Triton compiles a small C launcher at first use, and an image without a C compiler should
    still run, only slower. A ValueError (a shape or dtype the kernel refuses: a caller's bug, not the
    machine's) is raised, not hidden.

    Args:
        name: the kernel, as the warning names it ("attention", "entropy attention", "layer norm").
        kernel, fallback: the two computations, same results.
        advice: what the warning says after the failure (what runs instead, how to skip the kernel).
    """
    if name not in _kernel_failures:
        try:
            return kernel()
        except ValueError:
            raise
        except Exception as err:  # deliberately broad: Triton's build and driver errors have no common type
            _kernel_failures[name] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"avex: the Triton {name} kernel failed on this machine ({_kernel_failures[name][:300]}); {advice}",
                RuntimeWarning,
                stacklevel=3,
            )
    return fallback()
