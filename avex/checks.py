"""Argument checks shared by every layer: refusals that name the argument, the allowed range and the value.

A refusal is a ValueError whose message quotes the value at most :func:`brief`-ly (a refused batch of
100,000 actions must not come back as a 1.7 MB message).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "brief",
    "check_device",
    "check_folder",
    "check_int",
    "check_pixel_norm",
    "check_real",
    "check_writable",
    "is_int",
    "is_real",
]


def brief(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message must not echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def is_int(value: Any) -> bool:
    """An integer, numpy's included; bools are not."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A finite real number, numpy's included; bools are not, nor an int too large for a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # math.isfinite(10**400)
        return False


def check_int(name: str, value: Any, lo: int, hi: int | None = None, why: str = "") -> int:
    """``value`` as an int in ``lo..hi`` (numpy integers accepted, bools refused).

    Raises:
        ValueError: naming ``name``, the range (with ``why``) and the value.
    """
    if not is_int(value) or value < lo or (hi is not None and value > hi):
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


def check_real(
    name: str,
    value: Any,
    lo: float,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    why: str = "",
) -> float:
    """``value`` as a float: a finite real number (numpy's included, bools refused) in its range.

    ``lo_open`` / ``hi_open`` exclude a bound: ``check_real("--lr", lr, 0, lo_open=True)`` asks for ``lr > 0``.

    Raises:
        ValueError: naming ``name``, the range (with ``why``) and the value.
    """
    ok = is_real(value) and (value > lo if lo_open else value >= lo)
    ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        if hi is None:
            span = f"> {lo:g}" if lo_open else f">= {lo:g}"
        else:
            span = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be a number {span}{why}, got {brief(value)}")
    return float(value)


def check_pixel_norm(
    mean: Any,
    std: Any,
    channels: int | None = None,
    *,
    names: tuple[str, str] = ("mean", "std"),
    channels_text: str | None = None,
    one_for_all: bool = False,
    fix: str = "",
) -> None:
    """Refuse a pixel normalisation (``mean`` and ``std``, per channel; None: not given) that does not fit.

    Each is a non-empty list or tuple of finite real numbers (bools refused), std's > 0 (pixels are divided by
    it), one per channel: ``channels`` of them when known (or, with ``one_for_all``, one that serves every
    channel), else as many as the other. Any other count would be averaged into one constant per channel without
    a word (``avex.embedding._per_channel``, meant for timm's RGB defaults), so it is refused.

    Args:
        names: the arguments as the message names them (e.g. ``("--mean", "--std")``).
        channels_text: where ``channels`` comes from, as the message shows it (default ``in_chans=<channels>``).
        fix: what to do, added to the message.

    Raises:
        ValueError: "<name> must be <what is allowed>, got <value>", or the two counts that disagree.
    """
    then = f"; {fix}" if fix else ""
    for i, (name, values) in enumerate(zip(names, (mean, std))):
        if values is None:
            continue
        ok = isinstance(values, (list, tuple)) and len(values) > 0
        ok = ok and all(is_real(v) and (i == 0 or v > 0) for v in values)
        ok = ok and (channels is None or len(values) == channels or (one_for_all and len(values) == 1))
        if not ok:
            if channels is None:
                what = "finite numbers, one per channel"
            else:
                what = f"{channels} finite number(s), one per channel ({channels_text or f'in_chans={channels}'})"
                what += ", or one for every channel" if one_for_all and channels != 1 else ""
            each = ", each > 0 (pixels are divided by it)" if i else ""
            raise ValueError(f"{name} must be {what}{each}, got {brief(values)}{then}")
    if (
        mean is not None
        and std is not None
        and len(mean) != len(std)
        and not (one_for_all and 1 in (len(mean), len(std)))
    ):
        raise ValueError(
            f"{names[0]} and {names[1]} must have one value per channel each, got {brief(mean)} and {brief(std)}{then}"
        )


def check_folder(
    name: str, path: Path, fix: str, *, missing_ok: bool = False, error: type[Exception] = FileNotFoundError
) -> None:
    """Refuse ``path`` unless it is a folder (or, with ``missing_ok``, absent: a folder to be made), checked before any
    work: "<name> <path> is a file, not a folder: <fix>" or "... does not exist: <fix>", as ``error``."""
    if path.is_dir() or (missing_ok and not path.exists()):
        return
    what = "is a file, not a folder" if path.exists() else "does not exist"
    raise error(f"{name} {path} {what}: {fix}")


def check_writable(name: str, path: Any, folder: bool = False) -> Path:
    """``path`` as a Path where a file (or, with ``folder``, a folder) can be written, checked before any work.

    A file must not be an existing folder; the nearest existing folder on the way must be a writable folder
    (a file there, or no permission, would fail only when the results are saved, after the work).

    Raises:
        ValueError: naming ``name``, the path and what is in the way.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{name} must be a path, got {brief(path)}")
    given = Path(path)
    if not folder and given.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; give a file path such as {str(given / 'out')!r}")
    for place in ((given,) if folder else ()) + tuple(given.parents):
        if place.exists():
            if not place.is_dir():
                raise ValueError(
                    f"{name} {str(path)!r}: {str(place)!r} exists and is not a folder; choose another path"
                )
            if not os.access(place, os.W_OK | os.X_OK):
                raise ValueError(f"{name} {str(path)!r}: {str(place)!r} is not writable; choose another path")
            break
    return given
