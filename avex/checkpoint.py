"""Checkpoints: safetensors weights plus a small JSON config; loading never unpickles.

A checkpoint ``name.safetensors`` has ``name.json`` beside it::

    {"format": "avex-tore/1", "build": {create_tore arguments}, "meta": {class_names, dataset, ...}}

``load_tore`` rebuilds the model from ``build`` and loads the weights strictly. ``shared_model`` keeps one
instance per process and argument set, so environments made repeatedly (``gym.make`` deep-copies its
kwargs) share one model instead of loading it again.
"""

from __future__ import annotations

import json
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from avex.model import TOREViT, create_tore

__all__ = [
    "SHIPPED",
    "SHIPPED_POLICIES",
    "is_avex_checkpoint",
    "is_shipped",
    "load_tore",
    "read_config",
    "resolve_file",
    "save_tore",
    "shared_model",
    "shipped_checkpoint",
    "shipped_file",
]

FORMAT = "avex-tore/1"
SHIPPED_PREFIX = "shipped:"
# Files shipped inside the package, by kind and name: "shipped:<name>" refers to them.
SHIPPED = {"fashion-mnist": "fashion_mnist_tore"}
SHIPPED_POLICIES = {"fashion-mnist": "fashion_mnist_ppo"}


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


def is_shipped(ref: str | Path | None) -> bool:
    """Whether ``ref`` names a file shipped with avex (``"shipped:<name>"``)."""
    return isinstance(ref, str) and ref.startswith(SHIPPED_PREFIX)


def is_avex_checkpoint(ref: str | Path | None) -> bool:
    """Whether ``ref`` is an avex checkpoint: shipped, or a ``.safetensors`` file with its ``.json`` beside."""
    return ref is not None and (is_shipped(ref) or _paths(ref)[1].exists())


def resolve_file(ref: str | Path, policy: bool = False) -> Path:
    """The ``.safetensors`` file behind a reference: ``"shipped:<name>"`` (a classifier checkpoint, or a
    PPO policy with ``policy=True``) or a path, with or without its suffix. The file may not exist."""
    if is_shipped(ref):
        name = str(ref)[len(SHIPPED_PREFIX) :]
        return _shipped(name, SHIPPED_POLICIES, "PPO policy") if policy else shipped_checkpoint(name)
    return _paths(ref)[0]


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


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


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON config beside a checkpoint. Raises ValueError if it is missing or not an avex checkpoint."""
    weights, config = _paths(path)
    if not weights.exists():
        raise FileNotFoundError(f"checkpoint weights not found: {weights}")
    if not config.exists():
        raise ValueError(
            f"{weights} has no config {config.name} beside it: is it an avex checkpoint? "
            f"(a timm weights file goes in create_tore(weights=...))"
        )
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint config {config} is not valid JSON ({err}); re-save the checkpoint") from err
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{config} has format {cfg.get('format')!r}, expected {FORMAT!r}")
    return cfg


def load_tore(path: str | Path, device: str | torch.device = "cpu", expect: dict[str, Any] | None = None) -> TOREViT:
    """Rebuild a model from a checkpoint and load its weights (strict).

    Args:
        path: the ``.safetensors`` file (or its stem).
        expect: build arguments the caller requires (e.g. ``{"img_size": 112, "in_chans": 1}``); a
            checkpoint that disagrees raises ValueError naming the field, its value and the expected one.
    """
    cfg = read_config(path)
    build = dict(cfg["build"])
    for key, want in (expect or {}).items():
        have = build.get(key)
        if _norm(have) != _norm(want):
            raise ValueError(f"checkpoint {path} is for another architecture: {key}={have!r}, expected {want!r}")
    model = create_tore(**build)
    weights, _ = _paths(path)
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"cannot read checkpoint weights {weights}: {err}") from err
    load_state(model, state, str(weights))
    model.meta = cfg.get("meta", {})
    return model.to(device)


def load_state(model: TOREViT, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Strictly load weights, with an error that names missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own.keys() & state.keys()
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not fit this model (another architecture?): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SHARED: dict[tuple, TOREViT] = {}
_LOCK = threading.Lock()


def shared_model(
    model: str = "vit_tiny_patch16_224",
    checkpoint: str | None = None,
    pretrained: bool = False,
    device: str = "cpu",
    expect: dict[str, Any] | None = None,
    dtype: str = "float32",
    **build: Any,
) -> TOREViT:
    """One eval-mode model per process and argument set (environments share it, never copy it).

    Args:
        model: timm name, used when ``checkpoint`` is None or a plain timm weights file.
        checkpoint: an avex checkpoint (``.safetensors`` with ``.json`` beside), ``"shipped:<name>"``
            for a checkpoint in the package, or a timm weights file; None: ``pretrained`` decides.
        pretrained: timm hub weights (needs them in the local hub cache when offline).
        expect: build arguments an avex checkpoint must match (see :func:`load_tore`).
        dtype: "float32" or "bfloat16" (weights and token cache; pixels are normalised in float32).
        build: create_tore arguments (img_size, patch_size, in_chans, num_classes, depth, ...).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    key = (
        model,
        checkpoint,
        pretrained,
        str(device),
        dtype,
        repr(sorted((expect or {}).items())),
        repr(sorted(build.items())),
    )
    with _LOCK:
        if key not in _SHARED:
            path = resolve_file(checkpoint) if checkpoint is not None and is_shipped(checkpoint) else checkpoint
            if path is not None and is_avex_checkpoint(path):
                tore = load_tore(path, device, expect)
            else:
                weights = None if path is None else str(path)
                try:
                    tore = create_tore(model, pretrained=pretrained, weights=weights, **build).to(device)
                except (OSError, RuntimeError) as err:  # hub unreachable / not cached, unreadable file
                    if path is None and not pretrained:
                        raise
                    raise RuntimeError(
                        f"could not load weights for {model!r} ({'file ' + str(path) if path else 'timm hub'}): {err}. "
                        "Offline, pass checkpoint=<local timm or avex .safetensors file>, "
                        "or pretrained=False for random weights"
                    ) from err
            _SHARED[key] = tore.to(dtype=DTYPES[dtype]).eval().requires_grad_(False)
        return _SHARED[key]
