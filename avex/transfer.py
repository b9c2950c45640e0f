"""Host <-> device transfers without waiting for the device: one array (:func:`send`), or every array of a call in
ONE copy (an env step's outputs).

A vector step on a GPU must not wait for the GPU more than once: every small ``tensor.to("cuda")`` from
pageable memory and every ``.cpu()`` is a stream synchronisation. :func:`to_device` packs a call's NumPy
arrays into one pinned buffer sent with ``non_blocking=True`` (no synchronisation), :func:`to_host` packs a
call's tensors into one device buffer fetched with one copy (the one synchronisation). Blocks are laid out
by falling item size, so every block starts aligned for its dtype without padding. :func:`tree_to_device`
and :func:`tree_to_host` do the same for the leaves of a nested dict (an env's observations and infos).

On the CPU nothing is copied: arrays and tensors share memory (``torch.from_numpy``, ``Tensor.numpy``),
so callers pass fresh arrays and tensors (never views of state that a later step changes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["fill_rows", "send", "to_device", "to_host", "tree_to_device", "tree_to_host"]


def send(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """One fresh host array as a tensor on ``device``, without waiting for the device: on CUDA from pinned memory
    with a non-blocking copy (a copy from pageable memory waits for the device's queued work).

    Args:
        array: any shape and dtype; not changed later (on the CPU the tensor shares its memory).
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    # On CUDA the caching host allocator keeps the pinned block until the copy that reads it is done.
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


def _packed(device: torch.device, pack: bool | None) -> bool:
    """Whether to pack: on CUDA always (``pack=None``), elsewhere only when asked (tests)."""
    return device.type == "cuda" if pack is None else pack


def to_device(arrays: dict[str, np.ndarray], device: torch.device, pack: bool | None = None) -> dict[str, torch.Tensor]:
    """The arrays as tensors on ``device``, same dtypes and shapes: one non-blocking copy on CUDA.

    Args:
        arrays: NumPy arrays (numeric or bool; not object arrays), each fresh: on the CPU the tensor shares it.
        device: where the tensors go.
        pack: force (True) or skip (False) the packed copy; None: pack on CUDA only.

    Returns:
        {key: tensor}; on CUDA views of one device buffer (disjoint, so in-place writes stay apart).
    """
    device = torch.device(device)
    if not _packed(device, pack):
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
    order = sorted(arrays, key=lambda k: -arrays[k].dtype.itemsize)
    sizes = [arrays[k].nbytes for k in order]
    pinned = device.type == "cuda"  # a pinned buffer makes the copy asynchronous; the CPU has nothing to pin
    host = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pinned)
    flat = host.numpy()
    offsets = np.cumsum([0, *sizes])
    for k, start, stop in zip(order, offsets[:-1], offsets[1:]):
        flat[start:stop] = np.ascontiguousarray(arrays[k]).reshape(-1).view(np.uint8)
    # The caching host allocator keeps the pinned block until the copy is done, so it is never reused early.
    buf = host.to(device, non_blocking=True)
    out = {}
    for k, start, stop in zip(order, offsets[:-1], offsets[1:]):
        a = arrays[k]
        out[k] = buf[start:stop].view(_TORCH[a.dtype]).view(a.shape)
    return {k: out[k] for k in arrays}


def to_host(tensors: dict[str, torch.Tensor], pack: bool | None = None) -> dict[str, np.ndarray]:
    """The tensors as NumPy arrays: one device-to-host copy (one synchronisation) for all of them on CUDA.

    Args:
        tensors: tensors on one device, each fresh: on the CPU the array shares its memory.
        pack: force (True) or skip (False) the packed copy; None: pack on CUDA only.

    Returns:
        {key: array} of the tensors' dtypes and shapes; when packed, views of one host buffer.
    """
    if not tensors:
        return {}
    odd = sorted(k for k, v in tensors.items() if v.dtype not in _NUMPY)
    if odd:
        raise ValueError(f"to_host takes tensors of NumPy's dtypes; {odd} are not (cast them first)")
    device = next(iter(tensors.values())).device
    if not _packed(device, pack):
        return {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    flat = [tensors[k].detach().contiguous().view(-1).view(torch.uint8) for k in order]
    buf = torch.cat(flat)
    host = torch.empty(buf.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
    host.copy_(buf)  # the one synchronisation: the host needs the values now
    data = host.numpy()
    offsets = np.cumsum([0, *(f.numel() for f in flat)])
    out: dict[str, np.ndarray] = {}
    for k, start, stop in zip(order, offsets[:-1], offsets[1:]):
        t = tensors[k]
        out[k] = data[start:stop].view(_NUMPY[t.dtype]).reshape(tuple(t.shape))
    return {k: out[k] for k in tensors}


def fill_rows(t: torch.Tensor, rows: slice | torch.Tensor, value: bool | int | float) -> None:
    """``t[rows] = value`` without a copy to the device: a Python number written at a tensor of row indices
    (``index_put_``) is first copied to the device, and on CUDA that copy waits for the device; ``index_fill_``
    takes the number as a kernel argument.

    Args:
        t: [R, ...] on any device.
        rows: a slice, or int64 row indices on ``t``'s device.
        value: the number every element of those rows gets.
    """
    if isinstance(rows, slice):
        t[rows] = value  # a fill kernel
    else:
        t.index_fill_(0, rows, value)


def _leaves(tree: dict[str, Any], kind: type, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """The leaves of a nested dict that are instances of ``kind`` (NumPy object arrays excluded), by path."""
    found: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(_leaves(value, kind, path + (key,)))
        elif isinstance(value, kind) and not (isinstance(value, np.ndarray) and value.dtype.hasobject):
            found[path + (key,)] = value
    return found


def _replace(tree: dict[str, Any], new: dict[tuple[str, ...], Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of the nested dict with the leaves at the paths of ``new`` replaced."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        here = path + (key,)
        out[key] = _replace(value, new, here) if isinstance(value, dict) else new.get(here, value)
    return out


def tree_to_device(tree: dict[str, Any], device: torch.device, pack: bool | None = None) -> dict[str, Any]:
    """Every NumPy array of a nested dict as a tensor on ``device`` (one copy, :func:`to_device`); tensors and
    other leaves stay."""
    arrays = _leaves(tree, np.ndarray)
    sent = to_device({"/".join(p): a for p, a in arrays.items()}, device, pack)
    return _replace(tree, {p: sent["/".join(p)] for p in arrays})


def tree_to_host(tree: dict[str, Any], pack: bool | None = None) -> dict[str, Any]:
    """Every tensor of a nested dict as a NumPy array (one copy, :func:`to_host`); other leaves stay."""
    tensors = _leaves(tree, torch.Tensor)
    got = to_host({"/".join(p): t for p, t in tensors.items()}, pack)
    return _replace(tree, {p: got["/".join(p)] for p in tensors})


_NUMPY = {
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}
_TORCH = {np.dtype(v): k for k, v in _NUMPY.items()}
