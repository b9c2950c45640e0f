"""The run configuration, :class:`TrainConfig`, which is also the command line.

Every field carries its help text in ``field(metadata=...)``, plus what argparse needs beyond the
annotation (``nargs``, ``const``, ``metavar``, ``flag``; ``default_text`` where the default is not a
plain value). :func:`add_arguments` and :func:`config_from_args` are derived from the fields, so a new
setting is one new field. An annotation becomes a flag as follows:

* ``int``, ``float``, ``str``: ``--name-with-dashes VALUE`` of that type;
* ``X | None``: as ``X``, default None (for the model fields: the dataset's value, see :func:`resolve_config`);
* ``bool``: ``--name`` (store_true) when the default is False, ``--no-name`` (store_false) when it is True;
* ``Literal[...]``: the choices;
* ``tuple[X, ...]``: several values after the flag when the metadata gives ``nargs``, else one comma-separated value;
* ``cli=False`` in the metadata (``extra``): not on the command line.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

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


def _opt(default: Any, group: str, text: str, **cli: Any) -> Any:
    """A config field with its command-line group, help ``text`` and argparse extras (see the module doc)."""
    return field(default=default, metadata={"group": group, "help": text, **cli})


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
    # optimisation
    epochs: float = _opt(30.0, OPTIM, "passes over the training images")
    steps: int | None = _opt(None, OPTIM, "fixed number of optimisation steps (overrides --epochs)")
    batch_size: int = _opt(256, OPTIM, "GLOBAL batch, split across processes")
    lr: float | None = _opt(None, OPTIM, "peak learning rate")
    weight_decay: float = _opt(0.05, OPTIM, "AdamW weight decay (none on biases, norms, position embedding, tokens)")
    warmup: float = _opt(0.05, OPTIM, "linear warm-up as a fraction of all steps (then half-cosine to 0)")
    label_smoothing: float = _opt(0.0, OPTIM, "label smoothing (the flag alone: 0.1)", nargs="?", const=0.1)
    recon_weight: float = _opt(0.1, OPTIM, "weight of the masked reconstruction MSE")
    grad_clip: float = _opt(1.0, OPTIM, "gradient norm clip (0: off)")
    amp: bool = _opt(True, OPTIM, "bf16 autocast on CUDA (CPU always runs fp32)")
    compile: bool = _opt(False, OPTIM, "torch.compile each ViT block (dynamic shapes; CUDA)")
    seed: int = _opt(0, OPTIM, "seed of the model init and of every random draw of a step")
    device: str | None = _opt(None, OPTIM, "torch device", default_text="cuda:LOCAL_RANK if available, else cpu")
    # evaluation, logging, checkpoints
    eval_every: float = _opt(0.0, OUTPUT, "epochs between evaluations on a fixed subset (0: at the end only)")
    eval_subset: int = _opt(2000, OUTPUT, "images of the periodic evaluation")
    eval_size: int = _opt(0, OUTPUT, "images of the final evaluation (0: the whole test/val split)")
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
# The command line, derived from the fields
# ----------------------------------------------------------------------------------------------


def cli_fields() -> list[Field[Any]]:
    """The :class:`TrainConfig` fields that are command-line options, in declaration order."""
    return [f for f in fields(TrainConfig) if f.metadata.get("cli", True)]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option per :class:`TrainConfig` field to ``parser`` (e.g. ``avex train classifier``), in groups."""
    hints = get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in cli_fields():
        title = f.metadata["group"]
        group = groups[title] if title in groups else groups.setdefault(title, parser.add_argument_group(title))
        flag, spec = _option(f, hints[f.name])
        group.add_argument(flag, dest=f.name, **spec)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags: attributes that are not config fields are ignored, lists become tuples."""
    values: dict[str, Any] = {}
    for f in fields(TrainConfig):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value  # nargs gives a list
    return TrainConfig(**values)


def _option(f: Field[Any], annotation: Any) -> tuple[str, dict[str, Any]]:
    """(flag, add_argument keywords) of one field, from its annotation and metadata."""
    meta, kind = f.metadata, _strip_none(annotation)
    dashed = f.name.replace("_", "-")
    text = meta["help"].replace("%", "%%")  # argparse %-formats help strings
    if kind is bool:
        if f.default:  # on by default: the flag turns it off
            spec = dict(action="store_false", default=True, help=f"disable: {text} (default: enabled)")
            return meta.get("flag", f"--no-{dashed}"), spec
        return meta.get("flag", f"--{dashed}"), dict(action="store_true", default=False, help=f"{text} (default: off)")
    spec = {k: meta[k] for k in ("nargs", "const", "metavar") if k in meta}
    if get_origin(kind) is Literal:
        spec.update(choices=get_args(kind), type=type(get_args(kind)[0]))
    elif get_origin(kind) is tuple:
        item = get_args(kind)[0]
        spec["type"] = item if "nargs" in meta else _comma_list(item)
    elif kind in (int, float, str):
        spec["type"] = kind
    else:
        raise TypeError(f"TrainConfig.{f.name}: no command-line form for {annotation!r} (give it cli=False)")
    spec.update(default=f.default, help=f"{text} (default: {_default_text(f)})")
    return meta.get("flag", f"--{dashed}"), spec


def _strip_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _comma_list(item: Callable[[str], _T]) -> Callable[[str], tuple[_T, ...]]:
    """An argparse ``type`` reading ``"a,b,c"`` as a tuple of ``item`` values."""

    def parse(text: str) -> tuple[_T, ...]:
        return tuple(item(v) for v in text.split(","))

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}"  # argparse's error message names it
    return parse


def _show(value: Any) -> str:
    return "none" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _default_text(f: Field[Any]) -> str:
    """The default shown in the help: the metadata's words, the per-dataset values, or the value itself."""
    if "default_text" in f.metadata:
        return str(f.metadata["default_text"]).replace("%", "%%")
    defaults = {name: DATASETS.get(name).train_defaults() for name in DATASETS.names()}
    if f.default is None and any(f.name in d for d in defaults.values()):
        by_value: dict[str, list[str]] = {}
        for name, d in defaults.items():
            by_value.setdefault(_show(d[f.name]) if f.name in d else "the timm model's", []).append(name)
        return "per --dataset: " + "; ".join(f"{'/'.join(names)} {value}" for value, names in by_value.items())
    return _show(f.default)


# ----------------------------------------------------------------------------------------------
# Dataset defaults
# ----------------------------------------------------------------------------------------------


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the data set's training defaults (model, sizes, lr: :meth:`avex.data.DatasetSpec.train_defaults`)
    into a copy of ``cfg``; canonical data-set name, sorted train_k.

    Raises:
        ValueError: a data set that is not registered (the message lists the registered ones).
    """
    name = DATASETS.canonical(cfg.dataset)
    values = asdict(cfg)
    values["dataset"] = name
    for key, default in DATASETS.get(name).train_defaults().items():
        if values.get(key) is None:
            values[key] = default
    for key in ("mean", "std"):
        if values[key] is not None:
            values[key] = tuple(float(v) for v in values[key])
    if values["train_k"] is not None:
        values["train_k"] = tuple(sorted({int(k) for k in values["train_k"]}))
    return TrainConfig(**values)


def need(value: _T | None, name: str) -> _T:
    """A field that :func:`resolve_config` fills (``img_size``, ``lr``...): its value, never None."""
    if value is None:
        raise ValueError(f"TrainConfig.{name} is None: pass the config through resolve_config first")
    return value
