"""avex checkpoints: safetensors weights plus a small JSON config; references, loading, saving, the shared model.

A checkpoint ``name.safetensors`` has ``name.json`` beside it::

    {"format": "avex-tore/1", "build": {create_tore arguments}, "meta": {class_names, dataset, ...}}

``load_tore`` rebuilds the model from ``build`` and loads the weights strictly. ``shared_model`` keeps one
instance per process and argument set, so environments made repeatedly (``gym.make`` deep-copies its
kwargs) share one model instead of loading it again.

Every loader here keeps the loading rules of :mod:`avex.safeload` (safetensors only, never unpickling;
regular files only; strict loading), and these (``tests/test_reliability.py`` and ``tests/test_fuzz.py``
check them):

- A checkpoint's config is compared with its safetensors header before anything is allocated: the block
  counts first, then every tensor's name and shape against the model built on the meta device.
- A ``.safetensors`` file without its ``.json`` is a timm weights file, which must hold exactly the ViT
  being built (names and shapes); one holding an avex checkpoint's tensors is refused as a checkpoint that
  lost its config (it used to become a silently random model).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from avex.checks import brief, check_device, check_pixel_norm, is_int
from avex.model import TOREViT, create_tore
from avex.safeload import (
    build_on_meta,
    check_build_args,
    check_depths,
    check_file,
    check_size,
    fit_problem,
    load_state,
    read_header,
    read_json,
    tensor_shapes,
)

__all__ = [
    "SHIPPED",
    "SHIPPED_POLICIES",
    "built_digest",
    "is_avex_checkpoint",
    "is_shipped",
    "load_timm_weights",
    "load_tore",
    "read_config",
    "resolve_file",
    "save_tore",
    "shared_model",
    "shipped_checkpoint",
    "shipped_file",
    "weights_digest",
]

FORMAT = "avex-tore/1"
SHIPPED_PREFIX = "shipped:"
# Files shipped inside the package, by kind and name: "shipped:<name>" refers to them.
SHIPPED = {"fashion-mnist": "fashion_mnist_tore"}
# A policy named "<name>-k<K>" is a specialist for split point K: "shipped:<name>" resolves to it on an env at that K
# (agents.ppo.PPOAgent.from_env); the plain name is the policy trained at the env's default K.
SHIPPED_POLICIES = {"fashion-mnist": "fashion_mnist_ppo", "fashion-mnist-k6": "fashion_mnist_ppo_k6"}
# The decoder position order of configs saved before it was recorded (see avex.model.create_tore).
UNRECORDED_DECODER_POS = "row_col"


def shipped_file(stem: str) -> Path:
    """Path of ``avex/checkpoints/<stem>.safetensors`` (it may not exist)."""
    return Path(str(resources.files("avex") / "checkpoints" / f"{stem}.safetensors"))


def _shipped(name: str, table: dict[str, str], what: str) -> Path:
    if name not in table:
        raise ValueError(f"no shipped {what} named {name!r}; available: {sorted(table)}")
    path = shipped_file(table[name])
    if not path.exists():
        raise FileNotFoundError(
            f"the shipped {what} {path} is missing: reinstall avex, or train one and pass its path instead"
        )
    return path


def shipped_checkpoint(name: str) -> Path:
    """Path of a classifier checkpoint shipped in ``avex/checkpoints``. Raises FileNotFoundError if absent."""
    return _shipped(name, SHIPPED, "checkpoint")


def is_shipped(ref: str | os.PathLike[str] | None) -> bool:
    """Whether ``ref`` names a file shipped with avex (``"shipped:<name>"``)."""
    return isinstance(ref, str) and ref.startswith(SHIPPED_PREFIX)


def is_avex_checkpoint(ref: str | os.PathLike[str] | None) -> bool:
    """Whether ``ref`` is an avex checkpoint: shipped, or a ``.safetensors`` file with its ``.json`` beside."""
    return ref is not None and (is_shipped(ref) or _paths(ref)[1].exists())


def resolve_file(ref: str | os.PathLike[str], policy: bool = False) -> Path:
    """The ``.safetensors`` file behind a reference: ``"shipped:<name>"`` (a classifier checkpoint, or a
    PPO policy with ``policy=True``) or a path, with or without its suffix. The file may not exist.

    Raises:
        ValueError: ``ref`` is a folder (and no ``<ref>.safetensors`` file is beside it).
    """
    if is_shipped(ref):
        name = str(ref)[len(SHIPPED_PREFIX) :]
        return _shipped(name, SHIPPED_POLICIES, "PPO policy") if policy else shipped_checkpoint(name)
    weights = _paths(ref)[0]
    _refuse_folder(ref, weights, "PPO policy" if policy else "checkpoint")
    return weights


def _refuse_folder(ref: str | os.PathLike[str], weights: Path, what: str) -> None:
    """Refuse a folder given as a checkpoint's stem: else the message would name ``<folder>.safetensors``, a file
    nobody passed, as missing."""
    if not weights.exists() and Path(ref).is_dir():
        raise ValueError(f"{what} {str(ref)!r} is a folder: pass the .safetensors file itself (its .json beside it)")


def _as_path(ref: Any) -> Path:
    """``ref`` as a Path. Raises TypeError (naming the value) for anything but a str or os.PathLike."""
    if isinstance(ref, bool) or not isinstance(ref, (str, os.PathLike)):
        raise TypeError(
            f"a checkpoint is a path (str or pathlib.Path) or 'shipped:<name>', got {type(ref).__name__} {brief(ref)}"
        )
    return Path(ref)


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = _as_path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON config beside a checkpoint, checked: a JSON object of this format whose ``build`` is an
    object naming the timm model and no other source of weights.

    Raises:
        FileNotFoundError: the weights or the config do not exist.
        ValueError: the config is not an avex checkpoint config (the message says what is wrong).
    """
    weights, config = _paths(path)
    _refuse_folder(path, weights, "checkpoint")
    check_file(weights, "checkpoint weights")
    if not config.exists():
        raise ValueError(
            f"{weights} has no config {config.name} beside it: is it an avex checkpoint? "
            "(a timm weights file is passed as checkpoint= to an environment, or to load_timm_weights)"
        )
    cfg = read_json(config, "checkpoint config")
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{config} has format {brief(cfg.get('format'))}, expected {FORMAT!r}")
    build = cfg.get("build")
    if not isinstance(build, dict) or not isinstance(build.get("model"), str):
        raise ValueError(
            f"{config}: 'build' must be an object of create_tore arguments naming the timm model in 'model', "
            f"got {brief(build)}; re-save the checkpoint"
        )
    check_build_args(build, f"{config}: 'build'")
    # Not recorded: timm's default, 3 (RGB) for every timm ViT; save_tore records what the model was built with,
    # one value per channel (pixel normalisation: NaN here is NaN everywhere).
    in_chans = build.get("in_chans", 3)
    check_pixel_norm(
        build.get("mean"),
        build.get("std"),
        in_chans if is_int(in_chans) else None,
        names=(f"{config}: build 'mean'", f"{config}: build 'std'"),
        fix="re-save the checkpoint with save_tore",
    )
    if not isinstance(cfg.get("meta", {}), dict):
        raise ValueError(f"{config}: 'meta' must be an object, got {brief(cfg.get('meta'))}")
    return cfg


def load_tore(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    expect: dict[str, Any] | None = None,
    checkpoint_config: dict[str, Any] | None = None,
) -> TOREViT:
    """Rebuild a model from a checkpoint and load its weights (strict; see the module's loading rules).

    Args:
        path: the ``.safetensors`` file (or its stem).
        device: "cpu", "cuda", "cuda:<index>" or such a torch.device, checked before anything is read.
        expect: build arguments the caller requires (e.g. ``{"img_size": 112, "in_chans": 1}``); a
            checkpoint that disagrees raises ValueError naming the field, its value and the expected one.
        checkpoint_config: the checkpoint's config as :func:`read_config` returned it, from a caller that read it
            already (None: read here), so the file is read once.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a device this machine cannot use or an ``expect`` that is not a dict (both before any file
            is read), or anything else wrong with the checkpoint.
    """
    device = _check_device(device)
    _check_expect(expect)
    cfg = read_config(path) if checkpoint_config is None else checkpoint_config
    build = dict(cfg["build"])
    build.setdefault("decoder_pos", UNRECORDED_DECODER_POS)
    for key, want in (expect or {}).items():
        have = build.get(key)
        if _norm(have) != _norm(want):
            raise ValueError(f"checkpoint {path} is for another architecture: {key}={have!r}, expected {want!r}")
    weights, config = _paths(path)
    header = read_header(weights, "checkpoint weights")
    check_depths(build, str(config), header)
    problem = fit_problem(tensor_shapes(build_on_meta(build, str(config))), {k: s for k, (_, s) in header.items()})
    if problem:
        raise ValueError(f"checkpoint {weights} does not match its config {config.name}: {problem}")
    model = create_tore(**build)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read checkpoint weights {weights}: {err}") from err
    load_state(model, state, str(weights))
    model.meta = cfg.get("meta", {})
    return model.to(device)


def _check_device(device: Any) -> str:
    """``device`` (a str or torch.device) as a usable device string, checked before any file is read."""
    return check_device("device", str(device) if isinstance(device, torch.device) else device)


def _check_expect(expect: Any) -> None:
    """Refuse an ``expect`` that is not a dict of build arguments (a list failed later with AttributeError)."""
    if expect is not None and not (isinstance(expect, dict) and all(isinstance(k, str) for k in expect)):
        raise ValueError(
            f"expect must be a dict of build arguments (e.g. {{'in_chans': 1}}) or None, got {brief(expect)}"
        )


def _existing_weights(ref: str | os.PathLike[str]) -> Path:
    """The file behind a timm weights reference: the path itself, or it with ``.safetensors`` added."""
    given = _as_path(ref)
    for path in (given, _paths(ref)[0]):
        if path.exists() or path.is_symlink():
            return path
    raise FileNotFoundError(
        f"checkpoint not found: {given} (an avex checkpoint is <name>.safetensors with <name>.json beside it; "
        "a timm weights file is one .safetensors file)"
    )


def load_timm_weights(model: str, path: str | os.PathLike[str], **build: Any) -> TOREViT:
    """A TORE model over the timm ViT ``model`` (built with ``build``) with a timm safetensors file's weights.

    The file must hold exactly this ViT's tensors (names and shapes, as ``vit.state_dict()`` saves them);
    nothing is resized or dropped. The glimpse decoder, which timm files lack, keeps its initialisation.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a regular safetensors file, an avex checkpoint without its JSON, or tensors that do
            not fit the ViT (listed).
    """
    check_build_args(build, "model arguments")
    file = _existing_weights(path)
    header = read_header(file, "weights file")
    if any(k.startswith(("vit.", "decoder.")) for k in header):
        raise ValueError(
            f"{file} holds an avex checkpoint's tensors but its config {file.with_suffix('.json').name} is not "
            "beside it: copy the .json saved with it next to it (without it the file would be read as timm "
            "weights, which fit nothing)"
        )
    tore = create_tore(model, **build)
    problem = fit_problem(tensor_shapes(tore.vit), {k: s for k, (_, s) in header.items()})
    if problem:
        raise ValueError(
            f"timm weights file {file} does not fit {model!r} as built here ({brief(build)}): {problem}. "
            "The file must hold exactly this ViT's tensors: save one with "
            "safetensors.torch.save_file(vit.state_dict(), path)"
        )
    load_state(tore.vit, load_file(str(file)), str(file))
    return tore


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


# ------------------------------------------------------------------ saving
def save_tore(model: TOREViT, path: str | Path, meta: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Write ``path.safetensors`` and ``path.json``. ``half`` stores fp16 weights (half the size).

    Raises:
        ValueError: the model was not built by :func:`avex.model.create_tore` (nothing says how to rebuild it).
    """
    if model.build_args is None:
        raise ValueError(
            "only models built with avex.model.create_tore(name, ...) can be saved: "
            "the config records how to rebuild them"
        )
    weights, config = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(weights))
    config.write_text(json.dumps(dict(format=FORMAT, build=model.build_args, meta=meta or {}), indent=2, default=list))
    return weights


# ------------------------------------------------------------------ the per-process model
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SHARED: dict[tuple, TOREViT] = {}
_LOCK = threading.Lock()
# Each shared model's weights digest when shared_model built or loaded it (see built_digest).
_BUILT: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def weights_digest(model: nn.Module) -> str:
    """A SHA-256 of a model's tensors (names, dtypes, shapes, values), in a fixed order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def built_digest(model: nn.Module) -> str | None:
    """:func:`weights_digest` of a :func:`shared_model` model as it was built or loaded (None: not one).

    Whatever its arguments are, they rebuild a model with this digest in any process (with the same
    files, torch and timm): compare it with the model's current digest to know whether they still do.
    """
    return _BUILT.get(model)


def shared_model(
    model: str = "vit_tiny_patch16_224",
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    device: str = "cpu",
    expect: dict[str, Any] | None = None,
    dtype: str = "float32",
    checkpoint_config: dict[str, Any] | None = None,
    **build: Any,
) -> TOREViT:
    """One eval-mode model per process and argument set (environments share it, never copy it).

    Whatever the weights do not set (all of a random model, the glimpse decoder of timm weights) is
    initialised from a seed derived from the arguments, so the same arguments give the same model in every
    process: a pickled environment is rebuilt exactly from its arguments (:func:`built_digest` checks it).

    Args:
        model: timm name, used when ``checkpoint`` is None or a plain timm weights file.
        checkpoint: an avex checkpoint (``.safetensors`` with ``.json`` beside), ``"shipped:<name>"``
            for a checkpoint in the package, or a timm safetensors weights file; None: ``pretrained`` decides.
        pretrained: timm hub weights (needs them in the local hub cache when offline).
        expect: build arguments an avex checkpoint must match (see :func:`load_tore`).
        dtype: "float32" or "bfloat16" (weights and token cache; pixels are normalised in float32).
        checkpoint_config: an avex checkpoint's config, already read (see :func:`load_tore`); not part of the key.
        build: create_tore arguments (img_size, patch_size, in_chans, num_classes, depth, ...).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it cannot be loaded (see the module's loading rules), or a bad dtype, device or ``expect``
            (refused before any file is read).
        TypeError: ``checkpoint`` is not a path.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    device = _check_device(device)  # before the cache: a bad device must not become a key or read a file
    _check_expect(expect)
    ref = None if checkpoint is None else str(_as_path(checkpoint))  # a Path and its str share one model
    check_build_args(build, "model arguments")
    key = (
        model,
        ref,
        pretrained,
        str(device),
        dtype,
        repr(sorted((expect or {}).items())),
        repr(sorted(build.items())),
    )
    with _LOCK:
        if key not in _SHARED:
            # The seed ignores device and dtype: the same initial weights wherever the model runs.
            seed = int.from_bytes(hashlib.sha256(repr(key[:3] + key[5:]).encode()).digest()[:8], "little")
            with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
                torch.manual_seed(seed)
                tore = _ready(_acquire(model, ref, pretrained, device, expect, build, checkpoint_config), dtype)
            _BUILT[tore] = weights_digest(tore)
            _SHARED[key] = tore
        return _SHARED[key]


def _ready(tore: TOREViT, dtype: str) -> TOREViT:
    return tore.to(dtype=DTYPES[dtype]).eval().requires_grad_(False)


def _acquire(
    model: str,
    ref: str | None,
    pretrained: bool,
    device: str,
    expect: dict[str, Any] | None,
    build: dict[str, Any],
    checkpoint_config: dict[str, Any] | None,
) -> TOREViT:
    """Load or build the model behind :func:`shared_model`'s arguments."""
    path = resolve_file(ref) if ref is not None and is_shipped(ref) else ref
    if path is not None and is_avex_checkpoint(path):
        return load_tore(path, device, expect, checkpoint_config)
    # Arguments timm cannot build (an unknown keyword, heads that do not divide the width) or a model too
    # large: a ValueError naming them, found on the meta device before any memory is taken.
    source = f"model {model!r} with {brief(build)}"
    check_depths(build, source)
    check_size(build_on_meta({"model": model, **build}, source), source)
    if path is not None:
        return load_timm_weights(model, path, **build).to(device)
    try:
        return create_tore(model, pretrained=pretrained, **build).to(device)
    except (OSError, RuntimeError) as err:  # hub unreachable / not cached
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load weights for {model!r} (timm hub): {err}. "
            "Offline, pass checkpoint=<local timm or avex .safetensors file>, "
            "or pretrained=False for random weights"
        ) from err
