"""Convert MAE / AME / TORE-style PyTorch checkpoints into avex checkpoints (safetensors + JSON).

Those projects save ``{"model": state_dict}`` (MAE, AME) or a Lightning ``{"state_dict": ...}`` whose keys
start with ``mae.`` (TORE), with MAE's module names::

    cls_token, pos_embed, patch_embed.proj.*, blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*,
    norm.* (or fc_norm.* with global pooling), head.*,
    decoder_embed.*, mask_token, decoder_pos_embed, decoder_blocks.<i>.{...as blocks...}.*, decoder_norm.*,
    decoder_pred.*

In avex the timm ViT's tensors live under ``vit.`` (timm uses MAE's encoder names) and the glimpse decoder's
under ``decoder.`` (``embed``, ``mask_token``, ``blocks.<i>.{norm1, qkv, proj, norm2, mlp.0, mlp.2}``,
``norm``, ``pred``). The architecture is read off the tensors' shapes; the head counts cannot be, so they
are arguments. The decoder's fixed position table ``decoder_pos_embed`` is not loaded (avex computes it) but
checked: it must be MAE's sin-cos table (column first: ``decoder_pos="mae"``) or the transposed one, with a
zero CLS slot. The file is read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from avex.checkpoint import _paths, save_tore
from avex.checks import brief, check_int, check_pixel_norm, check_writable
from avex.model import TOREViT, create_tore
from avex.posembed import POS_ORDERS, grid_sincos

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "convert_mae_checkpoint", "tore_from_mae_state"]

# MAE, AME and TORE normalise pixels with ImageNet's statistics (timm's ViT-B default is 0.5 / 0.5).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# MAE name -> avex name, first match wins; \1 is the rest of the key.
_RENAMES = [
    (r"(cls_token|pos_embed|patch_embed\.proj\..*|blocks\..*|norm\..*|fc_norm\..*|head\..*)", r"vit.\1"),
    (r"decoder_embed\.(.*)", r"decoder.embed.\1"),
    (r"mask_token", r"decoder.mask_token"),
    (r"decoder_blocks\.(\d+)\.attn\.(qkv|proj)\.(.*)", r"decoder.blocks.\1.\2.\3"),
    (r"decoder_blocks\.(\d+)\.mlp\.fc1\.(.*)", r"decoder.blocks.\1.mlp.0.\2"),
    (r"decoder_blocks\.(\d+)\.mlp\.fc2\.(.*)", r"decoder.blocks.\1.mlp.2.\2"),
    (r"decoder_blocks\.(\d+)\.(norm1|norm2)\.(.*)", r"decoder.blocks.\1.\2.\3"),
    (r"decoder_norm\.(.*)", r"decoder.norm.\1"),
    (r"decoder_pred\.(.*)", r"decoder.pred.\1"),
]
_PREFIXES = ("module.", "mae.")  # DDP's wrapper; TORE's Lightning module holds the MAE as ``mae``


def _avex_key(key: str) -> str | None:
    """The avex name of a MAE tensor, or None for a name this converter does not know."""
    for pattern, repl in _RENAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _state_of(obj: Any, source: str, prefix: str | None) -> dict[str, torch.Tensor]:
    """The MAE state dict inside a loaded checkpoint, with its prefix stripped."""
    if isinstance(obj, Mapping):
        for container in ("model", "state_dict"):
            if isinstance(obj.get(container), Mapping):
                obj = obj[container]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source}: expected a state dict, or a dict holding one under 'model' or 'state_dict'")
    if prefix is None:  # strip a wrapper's prefix only when every key has it
        prefix = next((p for p in _PREFIXES if all(str(k).startswith(p) for k in obj)), "")
    state = {str(k)[len(prefix) :]: v for k, v in obj.items() if str(k).startswith(prefix)}
    if not state:
        raise ValueError(f"{source}: no key starts with the prefix {prefix!r}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: entries that are not tensors: {bad[:5]}")
    return state


def _need(state: Mapping[str, torch.Tensor], key: str, ndim: int, source: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{source}: no '{key}' tensor: not a MAE-style checkpoint (see avex.convert)")
    t = state[key]
    if t.ndim != ndim:
        raise ValueError(f"{source}: '{key}' has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def _count(state: Mapping[str, torch.Tensor], stack: str) -> int:
    """Blocks in ``<stack>.<i>.*``; they must be numbered 0..n-1."""
    idx = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(stack)}\.(\d+)\.", k))}
    if idx != set(range(len(idx))):
        raise ValueError(f"'{stack}' blocks are numbered {sorted(idx)}, expected 0..{len(idx) - 1}")
    return len(idx)


def _decoder_pos(table: torch.Tensor | None, grid: tuple[int, int], source: str) -> str:
    """Which order ``decoder_pos_embed`` [1, 1 + N, dim] is in (absent: MAE's); ValueError if neither fits."""
    if table is None:
        return "mae"
    dim = table.shape[-1]
    n = grid[0] * grid[1]
    if tuple(table.shape) != (1, 1 + n, dim):
        raise ValueError(f"{source}: 'decoder_pos_embed' has shape {tuple(table.shape)}, expected (1, {1 + n}, {dim})")
    table = table.float()
    if table[0, 0].abs().max() > 1e-6:  # avex adds no position to the decoder's CLS token
        raise ValueError(f"{source}: 'decoder_pos_embed' gives the CLS token a position; avex's decoder adds none")
    for order in POS_ORDERS:
        if torch.allclose(table[0, 1:], grid_sincos(grid, dim, order), atol=1e-4):
            return order
    raise ValueError(
        f"{source}: 'decoder_pos_embed' is not the fixed 2-D sin-cos table of the {grid[0]}x{grid[1]} grid in "
        f"either axis order {POS_ORDERS}; avex's decoder has no learned positions"
    )


def tore_from_mae_state(
    state: Mapping[str, torch.Tensor],
    *,
    decoder_heads: int | None,
    model: str = "vit_base_patch16_224",
    num_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    source: str = "state dict",
) -> TOREViT:
    """A :class:`TOREViT` holding a MAE-style state dict's weights (names as this module's docstring lists).

    Args:
        state: MAE's names, no prefix.
        decoder_heads: the decoder's attention heads (TORE: 4, MAE: 16); required when the state has a decoder.
        model: the timm ViT it is built as; embed_dim, depth, patch size, channels, classes, MLP ratio, qkv bias
            and pooling come from the tensors' shapes.
        num_heads: the encoder's attention heads; None: the timm model's own.
        img_size: (H, W) or a side; None: a square grid, from ``pos_embed``'s length.
        mean, std: the pixel normalisation the weights were trained with (default ImageNet's, as MAE's).
        source: names the state in errors.

    Returns:
        An eval-mode model whose ``build_args`` record the architecture (``decoder_pos`` included).

    Raises:
        ValueError: naming the tensor that does not fit (unknown, missing or mis-shaped), or the argument.
    """
    _check_args(decoder_heads, num_heads, mean, std)
    timm_args, grid = _timm_args(state, img_size, num_heads, source)
    decoder_dim = state["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in state else 0
    decoder_depth = _count(state, "decoder_blocks")
    if decoder_dim and (not decoder_depth or not decoder_heads or decoder_dim % decoder_heads):
        raise ValueError(
            f"{source}: a {decoder_dim}-wide decoder of {decoder_depth} blocks needs decoder_heads dividing "
            f"{decoder_dim}, got {decoder_heads!r}"
        )
    channels = timm_args["in_chans"]
    check_pixel_norm(mean, std, channels, channels_text=f"{source} has {channels}")
    try:
        tore = create_tore(
            model,
            decoder_dim=decoder_dim,
            decoder_heads=decoder_heads or 1,
            decoder_depth=max(decoder_depth, 1),
            decoder_pos=_decoder_pos(state.get("decoder_pos_embed"), grid, source),
            mean=mean,
            std=std,
            **timm_args,
        )
    except TypeError as err:  # a timm model of another family: ResNet.__init__() got an unexpected keyword 'img_size'
        raise ValueError(
            f"model {model!r} cannot be built as {timm_args} ({type(err).__name__}: {err}): pass the timm "
            "VisionTransformer the encoder was trained as, such as 'vit_base_patch16_224'"
        ) from err
    except (AssertionError, ZeroDivisionError) as err:  # timm asserts that the heads divide the width
        raise ValueError(
            f"{source}: {model!r} cannot be built as {timm_args} ({err or type(err).__name__}): pass num_heads "
            f"dividing embed_dim={timm_args['embed_dim']}, got num_heads={num_heads!r} (None: the timm model's own)"
        ) from err
    own = tore.state_dict()
    mapped = _mapped_state(
        state, own, f"{source} does not fit {model!r} built as {timm_args} with a {decoder_dim}-wide decoder"
    )
    tore.load_state_dict({k: v.to(own[k].dtype) for k, (_, v) in mapped.items()})
    return tore.eval()


def _check_args(
    decoder_heads: int | None, num_heads: int | None, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    """Refuse meaningless arguments before any tensor is read: timm takes num_heads=-1 and std=0 silently."""
    for name, heads in (("decoder_heads", decoder_heads), ("num_heads", num_heads)):
        if heads is not None:
            check_int(name, heads, 1)
    check_pixel_norm(mean, std)  # the channels are known once the tensors are read (tore_from_mae_state)


def _timm_args(
    state: Mapping[str, torch.Tensor], img_size: int | tuple[int, int] | None, num_heads: int | None, source: str
) -> tuple[dict[str, Any], tuple[int, int]]:
    """The timm ``create_model`` arguments the encoder's tensor shapes imply, and the patch grid (gh, gw)."""
    cls = _need(state, "cls_token", 3, source)
    proj = _need(state, "patch_embed.proj.weight", 4, source)
    pos = _need(state, "pos_embed", 3, source)
    embed_dim, in_chans, patch = cls.shape[-1], proj.shape[1], proj.shape[-1]
    n = pos.shape[1] - 1  # MAE's table has a CLS slot
    if img_size is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{source}: 'pos_embed' holds {n} patches, not a square grid: pass img_size=(H, W)")
        img_size = side * patch
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(hw) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hw):
        raise ValueError(f"img_size must be a positive int or (H, W), got {brief(img_size)}")
    if hw[0] % patch or hw[1] % patch:  # timm would floor it: the canvas's edge pixels would fall outside every patch
        raise ValueError(
            f"img_size {hw} is not a multiple of {source}'s {patch}-pixel patch: pass multiples of {patch}"
        )
    grid = (hw[0] // patch, hw[1] // patch)
    if grid[0] * grid[1] != n:
        raise ValueError(f"{source}: 'pos_embed' holds {n} patches; img_size {hw} with patch {patch} gives {grid}")
    fc1 = _need(state, "blocks.0.mlp.fc1.weight", 2, source)
    timm_args: dict[str, Any] = dict(
        img_size=hw if hw[0] != hw[1] else hw[0],
        patch_size=patch,
        in_chans=in_chans,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        embed_dim=embed_dim,
        depth=_count(state, "blocks"),
    )
    if num_heads is not None:
        timm_args["num_heads"] = num_heads
    if fc1.shape[0] != 4 * embed_dim:
        timm_args["mlp_ratio"] = fc1.shape[0] / embed_dim
    if "blocks.0.attn.qkv.bias" not in state:
        timm_args["qkv_bias"] = False
    if "fc_norm.weight" in state:  # MAE's fine-tuning with global pooling: fc_norm after the mean, no norm
        timm_args["global_pool"] = "avg"
    return timm_args, grid


def _mapped_state(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], what: str
) -> dict[str, tuple[str, torch.Tensor]]:
    """avex name -> (MAE name, tensor) for every tensor of the model.

    Raises:
        ValueError: ``what``, then the unknown, missing and mis-shaped tensors (the first five of each).
    """
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key == "decoder_pos_embed":  # checked by _decoder_pos; avex computes it
            continue
        new = _avex_key(key)
        if new is None or new not in own:
            unknown.append(key if new is None else f"{key} (as {new})")
        else:
            mapped[new] = (key, value)
    missing = sorted(set(own) - set(mapped))
    shapes = [
        f"{k} ({mapped[k][0]}): checkpoint {tuple(mapped[k][1].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in mapped and mapped[k][1].shape != own[k].shape
    ]
    if unknown or missing or shapes:
        raise ValueError(f"{what}: unknown tensors {unknown[:5]}, missing {missing[:5]}, shape mismatches {shapes[:5]}")
    return mapped


def convert_mae_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    decoder_heads: int | None,
    model: str = "vit_base_patch16_224",
    num_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    prefix: str | None = None,
    meta: dict[str, Any] | None = None,
    half: bool = False,
    overwrite: bool = False,
) -> Path:
    """Turn a MAE / AME / TORE PyTorch checkpoint into an avex checkpoint ``dst.safetensors`` + ``dst.json``.

    Args:
        src: the ``.pth`` / ``.ckpt`` file, read with ``torch.load(weights_only=True)``: ``{"model": ...}``,
            ``{"state_dict": ...}`` or a bare state dict.
        dst: the avex checkpoint to write (with or without ``.safetensors``).
        decoder_heads, model, num_heads, img_size, mean, std: see :func:`tore_from_mae_state`.
        prefix: keep only keys with this prefix, stripped (e.g. ``"mae."``); None: strip ``module.`` or
            ``mae.`` when every key has it.
        meta: recorded in the JSON's ``meta`` (``converted_from`` is added).
        half: store fp16 weights.
        overwrite: replace an existing ``dst`` (as timm's checkpoint scripts, refused by default).

    Returns:
        The ``.safetensors`` path written; :func:`avex.checkpoint.load_tore` reads it.

    Raises:
        FileNotFoundError: no ``src`` file.
        ValueError: the file holds no MAE-style state dict, a tensor does not fit (named in the message), or
            ``dst`` exists (without ``overwrite``) or cannot be written. Nothing is written then.
    """
    src = Path(src).expanduser()
    weights, config = _paths(Path(dst).expanduser())
    _check_dst(weights, config, overwrite)
    _check_args(decoder_heads, num_heads, mean, std)  # before src is read: a checkpoint may take minutes to load
    if not src.is_file():
        what = "is a folder" if src.is_dir() else "does not exist"
        raise FileNotFoundError(f"src {src} {what}: pass the .pth / .ckpt file of a MAE, AME or TORE checkpoint")
    obj = _load(src)
    state = _state_of(obj, str(src), prefix)
    tore = tore_from_mae_state(
        state,
        decoder_heads=decoder_heads,
        model=model,
        num_heads=num_heads,
        img_size=img_size,
        mean=mean,
        std=std,
        source=str(src),
    )
    # Written under temporary names, then renamed: an interrupted or failed write leaves no half checkpoint.
    tmp = weights.with_name(f".{weights.stem}.tmp-{os.getpid()}.safetensors")
    try:
        save_tore(tore, tmp, meta={**(meta or {}), "converted_from": src.name}, half=half)
        os.replace(tmp.with_suffix(".json"), config)
        os.replace(tmp, weights)
    finally:
        for part in (tmp, tmp.with_suffix(".json")):
            part.unlink(missing_ok=True)
    return weights


def _check_dst(weights: Path, config: Path, overwrite: bool) -> None:
    """Refuse a ``dst`` that exists (unless ``overwrite``), is a folder or whose folder cannot hold it, before
    reading ``src``."""
    for path in (weights, config):
        check_writable("dst", path)  # a folder first: it exists, but is no checkpoint to overwrite
        if path.exists() and not overwrite:
            raise ValueError(f"dst {path} already exists: pass another dst, or overwrite=True (--overwrite)")


def _load(src: Path) -> Any:
    """``torch.load(src, weights_only=True)``; a refusal as one line that says why and what to do."""
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zipfile and torch raise many types for files that are not checkpoints
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            # torch's own text is many lines of Python-API advice, with terminal escapes
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = f"a pickled {found.group(1)}" if found else "pickled objects other than tensors"
            raise ValueError(
                f"src {src} holds {what}, which torch.load(weights_only=True) refuses (it would run code): if you "
                "trust the file, save its weights alone, e.g. torch.save(torch.load(src, weights_only=False)"
                "['model'], 'weights.pth'), and convert that"
            ) from err
        raise ValueError(
            f"src {src} is not a PyTorch checkpoint torch.load can read ({type(err).__name__}: "
            f"{brief(str(err).splitlines()[0] if str(err) else '')}): pass a .pth / .ckpt file written by torch.save"
        ) from err
