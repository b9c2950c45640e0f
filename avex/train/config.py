"""The run configuration, :class:`TrainConfig`, which is also the command line (:mod:`avex.options`).

Every field carries its help text and group; :func:`add_arguments` and :func:`config_from_args` are
derived from the fields, so a new setting is one new field. ``None`` in a model field means the data
set's value (:func:`resolve_config`).
"""

from __future__ import annotations

import argparse
from dataclasses import Field, asdict, dataclass, field
from typing import Any, Literal, TypeVar

from avex import options
from avex.checks import brief, check_int, check_pixel_norm, check_real, is_int
from avex.data import DATASETS

__all__ = [
    "TrainConfig",
    "add_arguments",
    "cli_fields",
    "config_from_args",
    "need",
    "resolve_config",
]

# Argument groups of the command line, in this order.
DATA = "data"
MODEL = "model (defaults depend on --dataset)"
OPTIM = "optimisation"
OUTPUT = "evaluation, logging, checkpoints"

_T = TypeVar("_T")


_opt = options.option


@dataclass
class TrainConfig:
    """Everything a training run depends on; one command-line flag per field (None: the dataset's default)."""

    # data
    dataset: str = _opt(
        "fashion-mnist", DATA, "a registered data set (avex.data.DATASETS: fashion-mnist, imagenet, folder, ...)"
    )
    data_root: str | None = _opt(
        None,
        DATA,
        "Fashion-MNIST IDX folder, ImageNet root or image folder",
        default_text="the installed Fashion-MNIST; ImageNet: $AVEX_IMAGENET",
    )
    train_split: str | None = _opt(
        None, DATA, "split (sub-folder) to train on ('': the root itself)", default_text="the data set's: train"
    )
    val_split: str | None = _opt(
        None, DATA, "split (sub-folder) to evaluate on", default_text="the data set's: Fashion-MNIST test, else val"
    )
    clutter: int | None = _opt(
        None, DATA, "Fashion-MNIST clutter fragments per canvas", default_text="the data set's (Fashion-MNIST: 4)"
    )
    workers: int = _opt(4, DATA, "threads reading image files ahead of the training steps")
    # model
    model: str | None = _opt(None, MODEL, "timm model name")
    pretrained: bool = _opt(False, MODEL, "timm hub weights (from the local cache)")
    weights: str | None = _opt(None, MODEL, "local timm weights file to start from")
    init: str | None = _opt(
        None,
        MODEL,
        "avex checkpoint (.safetensors + .json) to start from: continue or fine-tune a run of the same architecture",
        metavar="CKPT",
    )
    depth: int | None = _opt(None, MODEL, "ViT blocks")
    embed_dim: int | None = _opt(None, MODEL, "token width")
    num_heads: int | None = _opt(None, MODEL, "attention heads")
    img_size: int | None = _opt(None, MODEL, "canvas side in pixels")
    patch: int | None = _opt(None, MODEL, "ViT patch side in pixels")
    in_chans: int | None = _opt(None, MODEL, "image channels")
    mean: tuple[float, ...] | None = _opt(None, MODEL, "pixel mean per channel, comma-separated")
    std: tuple[float, ...] | None = _opt(None, MODEL, "pixel std per channel, comma-separated")
    pos_init: Literal["sincos", "learned"] = _opt(
        "sincos", MODEL, "position embedding init from scratch: MAE's 2-D sin-cos table or timm's random one"
    )
    glimpse: int | None = _opt(None, MODEL, "glimpse side in patches")
    budget: int | None = _opt(None, MODEL, "glimpses per episode")
    train_k: tuple[int, ...] | None = _opt(
        None,
        MODEL,
        "split points to draw per batch (e.g. 6 to fine-tune for one K)",
        nargs="+",
        metavar="K",
        default_text="every K in 0..depth, TORE's policy",
    )
    train_t: tuple[int, ...] | None = _opt(
        None,
        MODEL,
        "glimpse counts to draw per batch, uniformly (e.g. 12 to fine-tune for the budget)",
        nargs="+",
        metavar="T",
        default_text="TORE's policy: U{1..budget} or U{budget..tiles}, half the batches each",
    )
    # optimisation
    epochs: float = _opt(30.0, OPTIM, "passes over the training images")
    steps: int | None = _opt(None, OPTIM, "fixed number of optimisation steps (overrides --epochs)")
    batch_size: int = _opt(256, OPTIM, "GLOBAL batch, split across processes")
    lr: float | None = _opt(None, OPTIM, "peak learning rate")
    weight_decay: float = _opt(0.05, OPTIM, "AdamW weight decay (none on biases, norms, position embedding, tokens)")
    warmup: float = _opt(0.05, OPTIM, "linear warm-up as a fraction of all steps (then half-cosine to 0)")
    label_smoothing: float = _opt(0.0, OPTIM, "label smoothing (the flag alone: 0.1)", nargs="?", const=0.1)
    recon_weight: float = _opt(0.1, OPTIM, "weight of the masked reconstruction MSE")
    distill: float = _opt(
        0.0,
        OPTIM,
        "self-distillation weight W: the loss adds W x KL(teacher || student), the teacher being the model's own "
        "prediction on the full view (every patch, K=0) without gradient, the student its prediction after the "
        "batch's glimpses (0: off; the eager step computes it)",
        metavar="W",
    )
    distill_temp: float = _opt(
        1.0, OPTIM, "distillation temperature: both predictions softened by it, the KL scaled by its square"
    )
    continuous_glimpses: float = _opt(
        0.0,
        OPTIM,
        "fraction of batches whose glimpses are random continuous (y, x, z) boxes, cut as the env's continuous "
        "mode cuts them, instead of grid glimpses (0: off; the eager step computes it)",
        metavar="P",
    )
    grad_clip: float = _opt(1.0, OPTIM, "gradient norm clip (0: off)")
    amp: bool = _opt(True, OPTIM, "bf16 autocast on CUDA (CPU always runs fp32)")
    compile: bool = _opt(False, OPTIM, "torch.compile each ViT block of the eager step (dynamic shapes; CUDA)")
    fused_step: Literal["auto", "on", "off"] = _opt(
        "auto",
        OPTIM,
        "the step in fewer, larger kernels: one compute dtype (bf16 under --amp), Triton attention for short rows, "
        "a decoder that queries only the unseen patches (auto: on CUDA without --compile; the CPU runs the eager step)",
    )
    cuda_graphs: Literal["auto", "on", "off"] = _opt(
        "auto",
        OPTIM,
        "capture the fused step (forward, backward, clipping, AdamW) as CUDA graphs, one per (K, T) "
        "(auto: on CUDA, one process or DDP's several, each graph holding the gradients' all-reduce; "
        "off: the fused step without graphs)",
    )
    seed: int = _opt(0, OPTIM, "seed of the model init and of every random draw of a step")
    device: str | None = _opt(None, OPTIM, "torch device", default_text="cuda:LOCAL_RANK if available, else cpu")
    # evaluation, logging, checkpoints
    eval_every: float = _opt(0.0, OUTPUT, "epochs between evaluations on a fixed subset (0: at the end only)")
    eval_subset: int = _opt(2000, OUTPUT, "images of the periodic evaluation")
    eval_size: int = _opt(
        0, OUTPUT, "images of the final evaluation (0: the whole evaluation split; a run under an epoch: --eval-subset)"
    )
    eval_batch_size: int = _opt(500, OUTPUT, "evaluation batch")
    out: str = _opt("runs/tore", OUTPUT, "checkpoint path without suffix (.safetensors, .json, .eval.md, .eval.json)")
    save_every: float = _opt(0.0, OUTPUT, "epochs between checkpoints (0: at the end only)")
    half: bool = _opt(False, OUTPUT, "store fp16 weights")
    log_json: str | None = _opt(None, OUTPUT, "JSON Lines file, one record per step (loss, ce, mse, acc, K, T, lr)")
    log_every: int = _opt(25, OUTPUT, "steps between progress updates (each one syncs the GPU once)")
    progress: bool = _opt(True, OUTPUT, "progress bar")
    extra: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "free-form, recorded in the checkpoint", "cli": False}
    )


# ----------------------------------------------------------------------------------------------
# The command line, derived from the fields (avex.options)
# ----------------------------------------------------------------------------------------------


def cli_fields() -> list[Field[Any]]:
    """The :class:`TrainConfig` fields that are command-line options, in declaration order."""
    return options.cli_fields(TrainConfig)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option per :class:`TrainConfig` field to ``parser`` (e.g. ``avex train classifier``), in groups."""
    return options.add_arguments(parser, TrainConfig, _default_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags: attributes that are not config fields are ignored, lists become tuples."""
    return options.from_args(TrainConfig, args)


def _default_text(f: Field[Any]) -> str | None:
    """A model default that depends on --dataset: the registered data sets' values (None: the plain default)."""
    defaults = {name: DATASETS.get(name).train_defaults() for name in DATASETS.names()}
    if f.default is not None or not any(f.name in d for d in defaults.values()):
        return None
    by_value: dict[str, list[str]] = {}
    for name, d in defaults.items():
        by_value.setdefault(options.show(d[f.name]) if f.name in d else "the timm model's", []).append(name)
    return "per --dataset: " + "; ".join(f"{'/'.join(names)} {value}" for value, names in by_value.items())


# ----------------------------------------------------------------------------------------------
# Dataset defaults
# ----------------------------------------------------------------------------------------------


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the data set's training defaults (model, sizes, lr: :meth:`avex.data.DatasetSpec.train_defaults`)
    into a copy of ``cfg``; canonical data-set name, sorted train_k and train_t.

    Every number is checked here, before a run sets anything up (:func:`~avex.train.train_classifier` starts
    with this), so a bad value reads no data, builds no model and writes nothing.

    Raises:
        ValueError: a data set that is not registered (the message lists the registered ones); a number out of
            its range (a count, a size, a fraction, a weight, the seed, ``mean``/``std`` that do not fit the
            channels, an ``img_size`` that is not a multiple of ``patch``): the message names the flag, what it
            allows and the value.
    """
    name = DATASETS.canonical(cfg.dataset)
    values = asdict(cfg)
    values["dataset"] = name
    for key, default in DATASETS.get(name).train_defaults().items():
        if values.get(key) is None:
            values[key] = default
    _check_objective(cfg)
    _check_numbers(values)
    for key in ("mean", "std"):
        if values[key] is not None:
            values[key] = tuple(float(v) for v in values[key])
    if values["train_k"] is not None:
        values["train_k"] = tuple(sorted({int(k) for k in values["train_k"]}))
    if values["train_t"] is not None:
        values["train_t"] = tuple(sorted({int(t) for t in values["train_t"]}))
    return TrainConfig(**values)


def _check_objective(cfg: TrainConfig) -> None:
    """ValueError for a distillation or continuous-glimpse setting out of range, naming the flag and the fix."""
    check_real("--distill", cfg.distill, 0, why=" (the distillation weight; 0: off)")
    check_real("--distill-temp", cfg.distill_temp, 0, lo_open=True, why=" (the temperature; 1: plain KL)")
    check_real("--continuous-glimpses", cfg.continuous_glimpses, 0, 1, why=" (the fraction of batches; 0: off)")


# The largest seed torch.manual_seed takes (numpy's SeedSequence takes any non-negative integer).
_SEED_MAX = 2**64 - 1
# Model sizes: None takes the data set's (or the timm model's) value; a given one is at least 1.
_SIZES = ("depth", "embed_dim", "num_heads", "img_size", "patch", "in_chans", "glimpse", "budget")


def _check_ints(values: dict[str, Any], name: str, lo: int, what: str, hi: str) -> None:
    """ValueError unless field ``name`` (``nargs='+'``) is None or one or more integers >= ``lo``; the upper bound,
    ``hi``, depends on the model and is checked once it is built (:func:`avex.train.loop.start_training`)."""
    given = values[name]
    if given is None:
        return
    seq = not isinstance(given, (str, bytes)) and hasattr(given, "__len__") and hasattr(given, "__iter__")
    if not (seq and len(given)) or not all(is_int(v) and v >= lo for v in given):
        shown = brief(list(given) if seq else given)
        flag = options.flag(TrainConfig, name)
        raise ValueError(f"{flag} {shown}: every {what} must be an integer in {lo}..{hi} (one or more)")


def _check_numbers(values: dict[str, Any]) -> None:
    """ValueError for a count, size, fraction, weight or seed out of range, naming the flag, what is allowed
    and the value. ``values``: the config's fields with the data set's defaults filled in."""
    # counts
    check_int("--batch-size", values["batch_size"], 1, why=" (the global batch)")
    if values["steps"] is not None:
        check_int("--steps", values["steps"], 1, why=" (leave it out to train for --epochs)")
    check_int("--eval-batch-size", values["eval_batch_size"], 1)
    check_int("--eval-subset", values["eval_subset"], 1, why=" (images of the periodic evaluation)")
    check_int("--eval-size", values["eval_size"], 0, why=" (0: the whole evaluation split)")
    check_int("--log-every", values["log_every"], 1, why=" (steps between progress updates)")
    check_int("--workers", values["workers"], 0, why=" (0: read on the training thread)")
    check_int("--seed", values["seed"], 0, _SEED_MAX)
    if values["clutter"] is not None:
        check_int("--clutter", values["clutter"], 0, why=" (0: no clutter)")
    for name in _SIZES:
        if values[name] is not None:
            check_int(options.flag(TrainConfig, name), values[name], 1)
    img, patch = values["img_size"], values["patch"]
    if img is not None and patch is not None and img % patch:  # timm floors the grid; patchify then fails on shapes
        near = " or ".join(str(v) for v in (img // patch * patch, (img // patch + 1) * patch) if v > 0)
        raise ValueError(
            f"--img-size must be a multiple of --patch {patch} (the canvas is cut into whole patches), got {img}: "
            f"use {near}, or another --patch"
        )
    _check_ints(values, "train_k", 0, "split point", "the model's depth")
    _check_ints(values, "train_t", 1, "glimpse count", "the non-overlapping glimpses of the grid")
    # lengths in epochs
    if values["steps"] is None:
        check_real(
            "--epochs",
            values["epochs"],
            0,
            lo_open=True,
            why=" (passes over the training images; or give --steps N)",
        )
    else:
        check_real("--epochs", values["epochs"], 0, why=" (--steps overrides it)")
    check_real("--eval-every", values["eval_every"], 0, why=" (0: at the end only)")
    check_real("--save-every", values["save_every"], 0, why=" (0: at the end only)")
    # the optimiser and the loss
    if values["lr"] is not None:
        check_real("--lr", values["lr"], 0, lo_open=True)
    check_real("--weight-decay", values["weight_decay"], 0, why=" (0: none)")
    check_real("--warmup", values["warmup"], 0, 1, why=" (a fraction of all steps)")
    check_real("--label-smoothing", values["label_smoothing"], 0, 1, hi_open=True, why=" (0: none)")
    check_real("--recon-weight", values["recon_weight"], 0, why=" (0: no reconstruction loss)")
    check_real("--grad-clip", values["grad_clip"], 0, why=" (0: off)")
    # pixel normalisation: one value also serves every channel (avex.embedding.GlimpseViT repeats it)
    channels = values["in_chans"]
    check_pixel_norm(
        values["mean"],
        values["std"],
        channels,
        names=("--mean", "--std"),
        channels_text=f"--in-chans {channels}",
        one_for_all=True,
    )


def need(value: _T | None, name: str) -> _T:
    """A field that :func:`resolve_config` fills (``img_size``, ``lr``...): its value, never None."""
    if value is None:
        raise ValueError(f"TrainConfig.{name} is None: pass the config through resolve_config first")
    return value
