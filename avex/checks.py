"""Argument checks shared by every layer: refusals that name the argument, the allowed range and the value.

A refusal is a ValueError whose message quotes the value at most :func:`brief`-ly (a refused batch of
100,000 actions must not come back as a 1.7 MB message).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["brief", "check_device", "check_int"]


def brief(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message must not echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_int(name: str, value: Any, lo: int, hi: int | None = None, why: str = "") -> int:
    """``value`` as an int in ``lo..hi`` (numpy integers accepted, bools refused).

    Raises:
        ValueError: naming ``name``, the range (with ``why``) and the value.
    """
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or value < lo or (hi is not None and value > hi):
        span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {span}{why}, got {brief(value)}")
    return int(value)


def check_device(name: str, value: Any) -> str:
    """``value`` as a torch device string this machine can use: "cpu", "cuda" or "cuda:<index>".

    Checked before anything is read or built: torch itself would refuse "gpu" only after a checkpoint is
    loaded, and "cuda" on a CPU-only build with an AssertionError.

    Raises:
        ValueError: naming ``name`` and the value; for CUDA, that it is not available or the devices there are.
    """
    wrong = f"{name} must be 'cpu', 'cuda' or 'cuda:<index>', got {brief(value)}"
    if not isinstance(value, str):
        raise ValueError(wrong)
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(wrong) from err
    if dev.type not in ("cpu", "cuda"):  # "meta" holds no data, others have no kernels here
        raise ValueError(wrong)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r} but CUDA is not available here: use {name}='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(f"{name}={value!r} but this machine has {n} CUDA device(s): use cuda:0..cuda:{n - 1}")
    return value
