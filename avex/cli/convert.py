"""``avex convert``: a MAE / AME / TORE-style PyTorch checkpoint -> an avex checkpoint (:mod:`avex.convert`).
The options are :class:`ConvertConfig`'s fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from avex import options
from avex.convert import IMAGENET_MEAN, IMAGENET_STD, convert_mae_checkpoint
from envs.models import check_timm_name

__all__ = ["ConvertConfig", "add_arguments", "main_from_args"]

FILES, MODEL = "files", "model (what the tensors' shapes cannot tell)"


@dataclass
class ConvertConfig:
    """One conversion; one ``avex convert`` flag per field."""

    src: str = options.option("", FILES, "the .pth / .ckpt file (read with torch.load(weights_only=True))")
    dst: str = options.option("", FILES, "the avex checkpoint to write (.safetensors and .json)")
    decoder_heads: int | None = options.option(None, MODEL, "attention heads of the glimpse decoder (AME/TORE: 4)")
    model: str = options.option("vit_base_patch16_224", MODEL, "timm ViT whose architecture the encoder has")
    num_heads: int | None = options.option(None, MODEL, "encoder attention heads", default_text="the timm model's")
    img_size: tuple[int, ...] | None = options.option(
        None, MODEL, "image side in pixels, or H,W", default_text="the timm model's"
    )
    mean: tuple[float, ...] = options.option(IMAGENET_MEAN, MODEL, "pixel mean per channel, comma-separated")
    std: tuple[float, ...] = options.option(IMAGENET_STD, MODEL, "pixel std per channel, comma-separated")
    prefix: str | None = options.option(
        None, FILES, "keep only keys with this prefix, stripped", default_text="module. or mae. when every key has it"
    )
    half: bool = options.option(False, FILES, "store fp16 weights")
    overwrite: bool = options.option(
        False, FILES, "replace an existing --dst (refused otherwise, as timm's scripts do)"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, ConvertConfig)


def main_from_args(args: argparse.Namespace) -> int:
    cfg = options.from_args(ConvertConfig, args)
    if not cfg.src or not cfg.dst:
        raise ValueError("avex convert needs --src <MAE/AME/TORE .pth> and --dst <avex checkpoint path>")
    if cfg.img_size is not None and len(cfg.img_size) not in (1, 2):  # H,W,... would drop the middle values
        raise ValueError(f"--img-size takes one side or H,W, got {','.join(map(str, cfg.img_size))}")
    try:  # by name on the meta device, before --src is read: another family failed in timm with a TypeError
        check_timm_name(cfg.model)
    except ValueError as err:
        raise ValueError(f"--model: {err}") from err
    path = convert_mae_checkpoint(
        cfg.src,
        cfg.dst,
        decoder_heads=cfg.decoder_heads,
        model=cfg.model,
        num_heads=cfg.num_heads,
        img_size=None if cfg.img_size is None else (cfg.img_size[0], cfg.img_size[-1]),
        mean=cfg.mean,
        std=cfg.std,
        prefix=cfg.prefix,
        half=cfg.half,
        overwrite=cfg.overwrite,
    )
    print(f"avex checkpoint written: {path} and {path.with_suffix('.json').name}; pass it as checkpoint=")
    return 0
