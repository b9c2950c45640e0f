"""Safe loading: weights files and model arguments checked, weights loaded strictly; nothing is unpickled.

The loading rules that every loader of weights (:mod:`avex.checkpoint`, the PPO agent's policy files) keeps
through these checks (``tests/test_reliability.py`` and ``tests/test_fuzz.py`` check them):

- Weights are read only by safetensors, from a file or from bytes; nothing is ever unpickled. Any other
  file (``.pth``, ``.bin``, a pickle) is refused with ValueError, and so is a ``build`` (or ``model_kwargs``)
  naming another source of weights (:data:`LOADING_ARGS`: timm would ``torch.load`` a file or go to the hub).
- Only regular files are opened (a FIFO would block forever); a missing file is FileNotFoundError.
- Loading is strict: a missing, unexpected or mis-shaped tensor, or a weight that is not floating point
  or not finite, refuses the whole load with a ValueError listing them; there is no partial load.

Model arguments are checked before anything is allocated: :func:`check_depths` (block counts),
:func:`build_on_meta` (what timm can build, every tensor's shape, on the meta device) and
:func:`check_size` (the parameter count).
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import timm
import torch
from safetensors import SafetensorError, safe_open
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from avex.checks import brief
from avex.model import TOREViT, create_tore

__all__ = [
    "LOADING_ARGS",
    "build_on_meta",
    "check_build_args",
    "check_depths",
    "check_file",
    "check_size",
    "fit_problem",
    "load_state",
    "read_header",
    "read_json",
    "tensor_shapes",
]

# create_tore / timm arguments that load weights from somewhere else: timm torch.loads (unpickles) a
# .pth file or goes to the hub. Never taken from a checkpoint's config or from model arguments.
LOADING_ARGS = frozenset(
    {"weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}
)
# create_tore's own arguments; the rest of a "build" goes to timm.create_model.
_WRAP_ARGS = ("decoder_dim", "decoder_heads", "decoder_depth", "decoder_pos", "mean", "std")
_TIMM_OVERRIDES = ("img_size", "patch_size", "in_chans", "num_classes")  # create_tore drops them when None
_MAX_JSON_BYTES = 16 * 2**20  # a config is a few kB: a bigger file is not one
_MAX_DEPTH = 1024  # blocks in a stack; the largest timm ViTs have 48
_MAX_PARAMETERS = 2**31  # 8 GiB of float32 weights; ViT-g/14 has about 1.1e9 parameters


# ------------------------------------------------------------------ files
def check_file(path: Path, what: str) -> Path:
    """``path`` itself if it is an existing regular file.

    Raises:
        FileNotFoundError: it does not exist.
        ValueError: it is a folder, a FIFO or a device (reading one could block forever), or unreadable.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror or err}") from err
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path} is not a regular file (a folder, FIFO or device): pass the file itself")
    return path


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A small JSON file holding an object (a checkpoint's or a policy's config).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a regular file, over 16 MiB, not JSON, or not a JSON object.
    """
    check_file(path, what)
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ValueError(f"{what} {path} is {path.stat().st_size} bytes: a config is a few kB, is it the right file?")
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{what} {path} is not valid JSON ({err}); re-save it") from err
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(value).__name__} {brief(value)}")
    return value


def read_header(path: Path, what: str = "weights file") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) from a safetensors file's header; the data is not read.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a regular file, or not a safetensors file (a ``.pth`` or ``.bin`` is refused: avex
            never unpickles).
    """
    check_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(
            f"{what} {path} is not a safetensors file ({err}). avex reads weights only from safetensors files and "
            "never unpickles: convert a trusted .pth/.bin yourself, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
        ) from err


def check_build_args(args: Mapping[str, Any], what: str) -> None:
    """Refuse model arguments that would load weights from elsewhere (:data:`LOADING_ARGS`).

    Raises:
        ValueError: naming the arguments.
    """
    bad = sorted(str(k) for k in args if k in LOADING_ARGS)
    if bad:
        raise ValueError(
            f"{what} may not hold {bad}: avex reads weights only from safetensors files it opens itself "
            "(timm would torch.load, i.e. unpickle, a file or go to the hub); pass the file as checkpoint= instead"
        )


# ------------------------------------------------------------------ strict loading
def fit_problem(own: Mapping[str, tuple[int, ...]], have: Mapping[str, tuple[int, ...]]) -> str | None:
    """What differs between a model's tensor shapes and a file's (None: they fit exactly)."""
    missing = sorted(own.keys() - have.keys())
    unexpected = sorted(have.keys() - own.keys())
    shapes = [
        f"{k}: checkpoint {tuple(have[k])} vs model {tuple(own[k])}"
        for k in sorted(own.keys() & have.keys())
        if tuple(own[k]) != tuple(have[k])
    ]
    if not (missing or unexpected or shapes):
        return None
    return (
        f"missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all), "
        f"shape mismatches {shapes[:5]} ({len(shapes)} in all)"
    )


def tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Strictly load weights: every tensor present with its shape, floating point where the model's is,
    and finite. Nothing is loaded unless all of them are.

    Raises:
        ValueError: naming missing, unexpected and mis-shaped tensors, or those of a wrong dtype or not finite.
    """
    own = model.state_dict()
    problem = fit_problem(tensor_shapes(model), {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ValueError(f"{source} does not fit this model (another architecture?): {problem}")
    dtypes = [
        f"{k}: {state[k].dtype}"
        for k in sorted(own)
        if state[k].is_floating_point() != own[k].is_floating_point()
        or (not own[k].is_floating_point() and state[k].dtype != own[k].dtype)
    ]
    if dtypes:
        raise ValueError(f"{source} holds weights of the wrong type (floating point expected): {dtypes[:5]}")
    nonfinite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if nonfinite:
        raise ValueError(f"{source} holds NaN or infinite weights in {nonfinite[:5]} ({len(nonfinite)} tensors)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _count_blocks(keys: Mapping[str, Any], prefix: str) -> int:
    """Number of blocks ``<prefix><i>.*`` among tensor names (largest index + 1)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def check_depths(build: Mapping[str, Any], source: str, header: Mapping[str, Any] | None = None) -> None:
    """Block counts, before anything is built (a "depth": 1000000 would otherwise allocate until the allocator
    fails, or build a million modules even on the meta device): each in 1.._MAX_DEPTH, and equal to the
    weights' (``header``) when there are weights."""
    stacks = [("depth", "vit.blocks.", build.get("depth"))]
    if build.get("decoder_dim", 128):
        stacks.append(("decoder_depth", "decoder.blocks.", build.get("decoder_depth", 1)))
    for arg, prefix, want in stacks:
        if want is None:  # timm's default for the model name: the meta build compares it
            continue
        if isinstance(want, bool) or not isinstance(want, int) or not 1 <= want <= _MAX_DEPTH:
            raise ValueError(f"{source}: {arg}={brief(want)} must be an integer in 1..{_MAX_DEPTH}")
        have = want if header is None else _count_blocks(header, prefix)
        if want != have:
            raise ValueError(
                f"{source}: the config says {arg}={want} but the weights hold {have} blocks ('{prefix}<i>.*'): "
                "config and weights do not belong together; re-save the checkpoint"
            )


def check_size(meta_model: nn.Module, source: str) -> None:
    """Refuse a model over :data:`_MAX_PARAMETERS` (counted on the meta device, before allocating)."""
    count = sum(v.numel() for v in meta_model.state_dict().values())
    if count > _MAX_PARAMETERS:
        raise ValueError(
            f"{source}: the model would have {count:,} parameters, over the {_MAX_PARAMETERS:,} avex builds "
            f"({4 * _MAX_PARAMETERS // 2**30} GiB in float32); check depth, embed_dim, mlp_ratio and img_size"
        )


def build_on_meta(build: Mapping[str, Any], source: str) -> TOREViT:
    """``create_tore(**build)`` on the meta device: every tensor's shape, no memory."""
    args = {k: v for k, v in build.items() if not (k in _TIMM_OVERRIDES and v is None)}
    name = args.pop("model")
    wrap = {k: args.pop(k) for k in _WRAP_ARGS if k in args}
    if isinstance(args.get("img_size"), list):
        args["img_size"] = tuple(args["img_size"])
    try:
        with torch.device("meta"):
            vit = cast(VisionTransformer, timm.create_model(name, pretrained=False, **args))
            return create_tore(vit, **wrap)
    except Exception as err:  # timm and torch raise many types for arguments they cannot build
        raise ValueError(
            f"{source}: timm cannot build this model ({type(err).__name__}: {brief(str(err))}); "
            "check its arguments (a checkpoint's: re-save it)"
        ) from err
