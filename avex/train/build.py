"""The classifier a run trains and its optimiser: build, initial weights, AdamW parameter groups, LR schedule."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn as nn

from avex.checkpoint import UNRECORDED_DECODER_POS, load_timm_weights, load_tore, read_config
from avex.checks import brief
from avex.model import TOREViT, create_tore
from avex.posembed import grid_coords, sincos_2d
from avex.safeload import build_on_meta, check_depths, check_size, load_state
from avex.train.config import TrainConfig, need

__all__ = [
    "build_classifier",
    "check_buildable",
    "init_sincos_pos_embed",
    "lr_factor",
    "make_optimizer",
    "param_groups",
    "prepare_classifier",
    "start_from_checkpoint",
    "warmup_steps",
]


def build_classifier(cfg: TrainConfig, num_classes: int, decoder_pos: str | None = None) -> TOREViT:
    """``create_tore`` from a config through :func:`~avex.train.config.resolve_config`; weights as timm inits
    them, or a local timm safetensors file's (``--weights``, read by safetensors only, never unpickled).

    Args:
        decoder_pos: the decoder's position order (None: create_tore's default for new models); ``--init``
            passes its checkpoint's, so older checkpoints keep theirs.
    """
    build = _build_args(cfg, num_classes, decoder_pos)
    if cfg.weights:
        return load_timm_weights(need(cfg.model, "model"), cfg.weights, **build)
    return create_tore(need(cfg.model, "model"), pretrained=cfg.pretrained, **build)


def _build_args(cfg: TrainConfig, num_classes: int, decoder_pos: str | None) -> dict[str, Any]:
    """The ``create_tore`` arguments of a run's model, besides the timm name."""
    build: dict[str, Any] = {
        k: v
        for k, v in dict(
            depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, decoder_pos=decoder_pos
        ).items()
        if v is not None
    }
    build.update(
        img_size=cfg.img_size, patch_size=cfg.patch, in_chans=cfg.in_chans, num_classes=num_classes, mean=cfg.mean
    )
    build["std"] = cfg.std
    return build


def check_buildable(cfg: TrainConfig) -> None:
    """Build a run's model on the meta device (shapes only, no memory) before any data are read.

    A timm model of another family (``--model resnet50``) or sizes timm refuses (``--num-heads`` not dividing
    ``--embed-dim``) otherwise failed inside timm, with its TypeError or AssertionError, after the data were loaded.

    Args:
        cfg: a config through :func:`~avex.train.config.resolve_config`.

    Raises:
        ValueError: an unknown timm name, or a model timm or TORE cannot build, naming ``--model``, the sizes and why.
    """
    import timm  # through avex.model, which makes timm importable first

    model = need(cfg.model, "model")
    if not isinstance(model, str) or not timm.is_model(model):
        raise ValueError(f"--model must be a timm ViT name (see timm.list_models('vit*')), got {brief(model)}")
    build = _build_args(cfg, 1, None)  # the classes come with the data; any count builds the same model
    source = f"--model {model!r} with {brief({k: v for k, v in build.items() if k != 'num_classes'})}"
    check_depths(build, source)
    check_size(build_on_meta({"model": model, **build}, source), source)


@torch.no_grad()
def init_sincos_pos_embed(model: TOREViT) -> None:
    """Start the (still learned) position embedding from a fixed 2-D sin-cos table (row first, then
    column: the transpose of MAE's order, harmless here because the table is learned on), prefix slots at 0.

    From scratch this gives every token its grid position from step one, which a random init has to learn.
    """
    pe = model.vit.pos_embed
    if pe is None:
        raise ValueError(f"{type(model.vit).__name__} has no learned position embedding to initialise")
    off = 0 if model.vit.no_embed_class else model.num_prefix
    pe[0, off:] = sincos_2d(grid_coords(model.grid, pe.device), model.embed_dim).to(pe.dtype)
    pe[0, :off] = 0


def start_from_checkpoint(model: TOREViT, path: str) -> dict[str, Any]:
    """Load an avex checkpoint's weights into ``model`` (``--init``): its build must equal the run's.

    Returns:
        the checkpoint's meta (recorded as ``init_from`` in the new checkpoint).

    Raises:
        ValueError: naming the first build field that differs (another architecture, image size, classes...).
    """
    src = load_tore(path, expect=model.build_args)
    load_state(model, src.state_dict(), path)
    return dict(cast("dict[str, Any]", src.meta))  # load_tore sets it


def prepare_classifier(
    cfg: TrainConfig, num_classes: int, device: torch.device
) -> tuple[TOREViT, dict[str, Any] | None]:
    """The model of a run on ``device``, in training mode, with its starting weights.

    ``--init`` loads a checkpoint; otherwise, from scratch (no pretrained or local timm weights), the
    position embedding starts from the sin-cos table unless ``pos_init`` is 'learned'. Draws from
    torch's global generator, so call it right after seeding it.

    Returns:
        (model, the ``--init`` checkpoint's meta or None).
    """
    if cfg.pos_init not in ("sincos", "learned"):
        raise ValueError(f"--pos-init must be sincos or learned, got {cfg.pos_init!r}")
    # An --init checkpoint keeps its decoder's position order (older ones predate MAE's, the new default).
    decoder_pos = read_config(cfg.init)["build"].get("decoder_pos", UNRECORDED_DECODER_POS) if cfg.init else None
    model = build_classifier(cfg, num_classes, decoder_pos).to(device).train()
    init_meta = None
    if cfg.init:
        init_meta = start_from_checkpoint(model, cfg.init)
    elif cfg.pos_init == "sincos" and not (cfg.pretrained or cfg.weights):
        init_sincos_pos_embed(model)
    if cfg.compile:  # per module, in place: one graph serves every K and T (state_dict keys unchanged)
        # Only the ViT's blocks: inductor's reduction heuristic (get_pw_red_splits) asserts on the decoder,
        # compiled whole or block by block.
        for blk in model.vit.blocks:
            blk.compile(dynamic=True)
    return model, init_meta


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, position embeddings and learned tokens."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token", "mask_token")
        (no_decay if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then half-cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """The warm-up of the learning rate schedule, in steps (at least one)."""
    return max(1, round(cfg.warmup * total_steps))


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device, capturable: bool = False
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW at the peak ``cfg.lr`` (fused on CUDA) and its schedule: ``cfg.warmup`` of ``total_steps``, then cosine.

    Args:
        capturable: for a step captured as a CUDA graph: the learning rate is a tensor on ``device`` (the
            scheduler writes into it) and the update reads its step counts on the device.
    """
    lr: float | torch.Tensor = need(cfg.lr, "lr")
    if capturable:
        if device.type != "cuda":
            raise ValueError(f"a capturable optimiser needs a CUDA device, got {device}")
        lr = torch.tensor(lr, device=device)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr,
        betas=(0.9, 0.999),
        fused=device.type == "cuda",
        capturable=capturable,
    )
    warmup = warmup_steps(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    return optimizer, scheduler
