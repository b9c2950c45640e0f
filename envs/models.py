"""The model an environment runs: which timm ViTs TORE can wrap, checked before anything is built.

:func:`env_model` gives an :class:`envs.config.EnvConfig` its process-wide shared model, at the model's own
patch unless the config names one (:attr:`EnvConfig.resolved_patch`). A timm name TORE cannot wrap is
refused by :func:`check_timm_name` on the meta device, before timm builds it: a hybrid CNN stem would
otherwise fail inside timm with a bare ``AssertionError`` and parallel blocks inside the FLOP count.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from avex.checkpoint import is_avex_checkpoint, read_config, resolve_file, shared_model
from avex.data import CanvasSource
from avex.model import TOREViT
from envs.config import EnvConfig, check_grid

__all__ = ["SUPPORTED_MODELS", "check_model", "check_timm_name", "env_model", "tore_problem"]

SUPPORTED_MODELS = (
    "plain timm VisionTransformer models with one class token, absolute position embeddings, a patch-embedding "
    "convolution and standard blocks: vit_* (AugReg, CLIP, DINO, DINOv2 with or without registers, ...), "
    "deit_* and deit3_* (not the distilled ones), flexivit_*; not hybrid CNN stems (vit_*_r*_*, vit_*_resnet*), "
    "parallel blocks (vit_*_18x2_*, vit_*_xp_*), distillation tokens, attention pooling (SigLIP), models without "
    "a class token (*_gap_*) or other classes (EVA, BEiT, relative positions, SAM)"
)


def tore_problem(vit: nn.Module) -> str | None:
    """Why TORE cannot run ``vit`` (a timm model, real or on the meta device); None when it can."""
    from timm.layers import PatchEmbed  # lazy: timm is imported through avex's shim (avex.model) first
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(vit) is not VisionTransformer:  # subclasses change the token layout (distilled, relative positions)
        return f"it is a {type(vit).__name__}, not a plain timm VisionTransformer"
    if type(vit.patch_embed) is not PatchEmbed or not isinstance(vit.patch_embed.proj, nn.Conv2d):
        return f"its patch embedding is a {type(vit.patch_embed).__name__} (a CNN stem), not a patch convolution"
    blocks = {type(b).__name__ for b in vit.blocks if type(b) is not Block}
    if blocks:
        return f"its blocks are {sorted(blocks)}, not timm's Block (the iterator/aggregator split and FLOPs need it)"
    if vit.cls_token is None:
        return "it has no class token"
    if vit.pos_embed is None:
        return "it has no absolute position embeddings"
    if vit.global_pool not in ("token", "avg") or getattr(vit, "attn_pool", None) is not None:
        return f"it pools with {vit.global_pool!r} (TORE reads the class token or the mean token)"
    return None


@functools.lru_cache(maxsize=64)
def check_timm_name(name: str) -> int:
    """The default patch of a timm model TORE can wrap (its name's architecture, built on the meta device).

    Raises:
        ValueError: an unknown name, or a model TORE cannot wrap (the message names the supported families).
    """
    from avex._compat import ensure_timm_importable

    ensure_timm_importable()
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}: see timm.list_models('vit*')")
    with torch.device("meta"):  # shapes and classes only: no memory, no weights
        vit = timm.create_model(name, pretrained=False)
    problem = tore_problem(vit)
    if problem:
        raise ValueError(f"model {name!r} cannot run in an AVE environment: {problem}. Supported: {SUPPORTED_MODELS}")
    assert isinstance(vit, VisionTransformer), "tore_problem accepts only VisionTransformer"
    return int(vit.patch_embed.patch_size[0])


def check_model(cfg: EnvConfig) -> int | None:
    """Refuse a config's timm model that TORE cannot wrap (cheap: before the data are read); its default patch.

    None for an avex checkpoint, whose architecture is its own (checked once loaded, by :func:`env_model`).
    """
    return None if is_avex_checkpoint(cfg.checkpoint) else check_timm_name(cfg.model)


def env_model(cfg: EnvConfig, source: CanvasSource) -> TOREViT:
    """The process-wide shared model for a config, checked against the data's canvas and classes.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: a timm model TORE cannot wrap, a checkpoint that cannot be loaded, or a model whose image
            size, channels, classes or patch do not fit the environment.
    """
    h, w, c = source.canvas_shape
    patch = cfg.resolved_patch
    if is_avex_checkpoint(cfg.checkpoint):
        if cfg.model_kwargs:
            raise ValueError(
                "model_kwargs apply to timm models; an avex checkpoint records its own architecture: drop model_kwargs"
            )
        read = _check_checkpoint_model(cfg)
        model = shared_model(
            cfg.model, cfg.checkpoint, cfg.pretrained, cfg.device, dtype=cfg.dtype, checkpoint_config=read
        )
    else:
        own = check_model(cfg)
        build: dict[str, Any] = dict(img_size=h if h == w else (h, w), in_chans=c, num_classes=source.num_classes)
        if patch is not None:
            build["patch_size"] = patch
        build.update(cfg.model_kwargs or {})
        _check_patch_grid(cfg.model, (h, w), build.get("patch_size", own))
        model = shared_model(cfg.model, cfg.checkpoint, cfg.pretrained, cfg.device, dtype=cfg.dtype, **build)
    problem = tore_problem(model.vit)  # a checkpoint's architecture, or model_kwargs that changed it
    if problem:
        raise ValueError(f"model {cfg.checkpoint or cfg.model!r} cannot run in an AVE environment: {problem}")
    _check_fit(cfg, model, (h, w, c), source.num_classes, patch)
    return model


def _check_checkpoint_model(cfg: EnvConfig) -> dict[str, Any] | None:
    """Refuse ``model=`` or ``pretrained=True`` given beside an avex checkpoint, which they would not change.

    Only values that differ from the id's registered ones count as given (an env cannot tell a registered
    default from the same value passed again), and a model name counts only if it is not the checkpoint's own.
    Returns the checkpoint's config where it was read to compare the names (the model is loaded from it), else None.
    """
    if cfg.pretrained and not cfg.spec.pretrained:
        raise ValueError(
            f"pretrained=True loads timm's weights, but checkpoint={str(cfg.checkpoint)!r} holds its own: "
            "drop pretrained, or pass checkpoint=None for timm's pretrained weights"
        )
    if cfg.model != cfg.spec.model and cfg.checkpoint is not None:
        config = read_config(resolve_file(cfg.checkpoint))
        own = config["build"].get("model")
        if cfg.model != own:
            raise ValueError(
                f"model={cfg.model!r} is not the architecture of checkpoint={str(cfg.checkpoint)!r} ({own!r}), which "
                f"records its own: drop model, or pass checkpoint=None to build {cfg.model!r} from timm"
            )
        return config
    return None


def _check_patch_grid(name: str, canvas: tuple[int, int], patch: Any) -> None:
    """Refuse, before the model is allocated, a canvas that is no whole number of patches or a grid too large."""
    if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0:
        return  # not a plain side (a pair from model_kwargs): timm checks it, and the built model is compared
    h, w = canvas
    if h % patch or w % patch:
        side = h if h % patch else w
        low, high = side // patch * patch, (side // patch + 1) * patch
        raise ValueError(
            f"the {h}x{w} canvas is not a whole number of {patch} px patches (model {name!r}): "
            f"pass image_size={high}{f' or {low}' if low else ''}, or patch= to build the model at another patch"
        )
    check_grid((h // patch, w // patch))


def _check_fit(cfg: EnvConfig, model: TOREViT, canvas: tuple[int, int, int], classes: int, patch: int | None) -> None:
    """Refuse a model whose image size, channels, classes or patch differ from what the environment needs."""
    # Checked on the built model rather than through shared_model(expect=...): a checkpoint config
    # records only the arguments it was created with (a patch implied by the timm name is absent).
    h, w, c = canvas
    want = {
        "image size": ((h, w), model.img_size),
        "channels": (c, model.in_chans),
        "classes": (classes, model.num_classes),
    }
    if patch is not None:
        want["patch"] = (patch, model.patch)
    wrong = {k: v for k, v in want.items() if v[0] != v[1]}
    if wrong:
        what = ", ".join(f"{k} {have} (the environment needs {need})" for k, (need, have) in wrong.items())
        raise ValueError(
            f"model {cfg.checkpoint or cfg.model!r} does not fit this environment: it has {what}. "
            f"Pass a checkpoint made for this data and geometry, or change image_size/patch"
        )
