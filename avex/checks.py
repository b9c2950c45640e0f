"""Argument checks shared by every layer: refusals that name the argument, the allowed range and the value.

A refusal is a ValueError whose message quotes the value at most :func:`brief`-ly (a refused batch of
100,000 actions must not come back as a 1.7 MB message).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["brief", "check_int"]


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
