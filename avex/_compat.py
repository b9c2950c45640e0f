"""Import-time compatibility shims: timm importable beside a CUDA torchvision, torch safe to fork.

Why this exists
---------------
``timm`` imports ``torchvision``.  On our CPU-only machines the environment has
CPU ``torch`` together with the torchvision wheel from PyPI, which is built for
CUDA: its native extension ``torchvision/_C.so`` links ``libcudart`` and cannot
be loaded.  torchvision tolerates that (``extension._has_ops()`` becomes
False) *except* for two fake-kernel registrations in
``torchvision/_meta_registrations.py``::

    @torch.library.register_fake("torchvision::nms")
    @torch.library.register_fake("torchvision::qnms")

which run unconditionally and need the operator *schemas* to exist, so
``import torchvision`` (hence ``import timm``) dies with
``RuntimeError: operator torchvision::nms does not exist``.

:func:`ensure_timm_importable` defines just those two schemas (no kernels) in a
``torchvision`` FRAGMENT library before torchvision is imported, and only when
torchvision is installed, its schema is absent and its native library really
fails to load.  Calling ``torchvision.ops.nms`` afterwards still fails (there is
no kernel), exactly as it would with any torchvision whose ops did not load;
avex never calls it.  Where torchvision loads normally nothing is done.

Importing this module applies the shim, and ``avex/__init__.py`` imports it before anything else, so every
``avex`` module can ``import timm`` at its top: importing any ``avex.*`` module runs ``avex/__init__.py``
first.  Code that imports ``timm`` without importing ``avex`` first calls :func:`ensure_timm_importable`
itself.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import threading

import torch

__all__ = ["ensure_timm_importable"]

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_MISSING_OPS = ("nms", "qnms")

# Kept alive at module level: a torch.library.Library deregisters its
# definitions when it is garbage-collected.
_LIB: torch.library.Library | None = None
_LOCK = threading.Lock()


def _has_schema(qualname: str) -> bool:
    find = getattr(torch._C, "_dispatch_find_schema_or_throw", None)
    if find is None:  # private API; fall back to the JIT operator registry
        return bool(torch._C._jit_get_schemas_for_operator(qualname))
    try:
        find(qualname, "")
        return True
    except RuntimeError:
        return False


def _torchvision_native_loads() -> bool | None:
    """Whether torchvision's ``_C`` extension loads; None if torchvision is absent.

    Looks the extension up the way torchvision does, without importing
    torchvision itself (that import is what fails).
    """
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for lib_dir in spec.submodule_search_locations:
        finder = importlib.machinery.FileFinder(
            lib_dir,
            (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
        )
        ext = finder.find_spec("_C")
        if ext is None or not ext.origin:
            continue
        try:
            # Same call torchvision makes on import; loading twice is a no-op.
            torch.ops.load_library(ext.origin)
            return True
        except (ImportError, OSError):
            return False
    return False  # installed, but no native extension at all


def ensure_timm_importable() -> bool:
    """Make ``import timm`` work with a torchvision whose native ops cannot load.

    Must run before the first ``import timm``/``import torchvision``; importing this module (hence
    importing ``avex``) already calls it.  Idempotent.

    Returns True if (in this process) the workaround is in place, i.e. the
    missing ``torchvision::nms``/``torchvision::qnms`` schemas were defined by
    avex; False if nothing was needed (torchvision absent, or its ops exist or
    its native library loads).
    """
    global _LIB
    with _LOCK:
        if _LIB is not None:
            return True
        if _has_schema("torchvision::nms"):
            return False
        if _torchvision_native_loads() is not False:
            return False

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in _MISSING_OPS:
            if not _has_schema(f"torchvision::{name}"):
                lib.define(f"{name}{_NMS_SCHEMA}")
        _LIB = lib
        return True


# Applied on import: ``avex/__init__.py`` imports this module first, so no other module has to call it.
ensure_timm_importable()


def _one_torch_thread_in_forked_children() -> None:
    """A process forked after torch's CPU thread pool started hangs in its first parallel region (the
    pool's threads do not survive the fork): Gymnasium's ``AsyncVectorEnv`` forks its workers so. A forked
    child therefore runs torch on one thread, as its workers share the parent's cores anyway."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


_one_torch_thread_in_forked_children()
