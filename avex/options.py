"""Command lines derived from config dataclasses (CleanRL's habit: the config is the command line).

Every field carries its help text and command-line group in ``field(metadata=...)`` (see :func:`option`),
plus what argparse needs beyond the annotation (``nargs``, ``const``, ``metavar``, ``flag``;
``default_text`` where the default is not a plain value). :func:`add_arguments` and :func:`from_args`
are derived from the fields, so a new setting is one new field. An annotation becomes a flag as follows:

* ``int``, ``float``, ``str``: ``--name-with-dashes VALUE`` of that type;
* ``X | None``: as ``X``, default None;
* ``bool``: ``--name`` (store_true) when the default is False, ``--no-name`` (store_false) when it is True;
* ``Literal[...]``: the choices;
* ``tuple[X, ...]``: several values after the flag when the metadata gives ``nargs``, else one comma-separated value;
* ``dict[str, Any]``: a JSON object (``--env-kwargs '{"clutter": 0}'``);
* ``cli=False`` in the metadata: not on the command line.
"""

from __future__ import annotations

import argparse
import json
import types
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = ["add_arguments", "cli_fields", "flag", "from_args", "json_object", "option", "show"]

_T = TypeVar("_T")
C = TypeVar("C")


def option(default: Any, group: str, text: str, **cli: Any) -> Any:
    """A config field with its command-line ``group``, help ``text`` and argparse extras (see the module doc).

    A dict default is given fresh to every instance (a dataclass field cannot share one).
    """
    metadata = {"group": group, "help": text, **cli}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def cli_fields(cls: type) -> list[Field[Any]]:
    """The fields of dataclass ``cls`` that are command-line options, in declaration order."""
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, default_text: Callable[[Field[Any]], str | None] | None = None
) -> argparse.ArgumentParser:
    """Add one option per field of dataclass ``cls`` to ``parser``, in the fields' groups.

    Args:
        default_text: the default to show for a field, where a plain value would mislead (None: the value).
    """
    hints = get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in cli_fields(cls):
        title = f.metadata.get("group", "options")
        group = groups[title] if title in groups else groups.setdefault(title, parser.add_argument_group(title))
        shown = default_text(f) if default_text is not None else None
        group.add_argument(_flag(f, hints[f.name]), dest=f.name, **_option(f, hints[f.name], shown))
    return parser


def flag(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of dataclass ``cls``, as :func:`add_arguments` spells it, for
    messages that name it: ``batch_size`` -> ``--batch-size``, ``--no-amp`` for a bool on by default."""
    return _flag(next(f for f in fields(cls) if f.name == name), get_type_hints(cls)[name])


def _flag(f: Field[Any], annotation: Any) -> str:
    """Field ``f``'s flag: the metadata's ``flag``, else its name with dashes (``--no-`` for a bool on by default)."""
    dashed = f.name.replace("_", "-")
    on_by_default = _strip_none(annotation) is bool and f.default is True
    return str(f.metadata.get("flag", f"--no-{dashed}" if on_by_default else f"--{dashed}"))


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """An instance of dataclass ``cls`` from parsed flags: other attributes are ignored, lists become tuples."""
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]  # cls is a dataclass type by contract
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value  # nargs gives a list
    return cls(**values)


def _option(f: Field[Any], annotation: Any, shown: str | None) -> dict[str, Any]:
    """The add_argument keywords of one field (its flag: ``_flag``), from its annotation and metadata."""
    meta, kind = f.metadata, _strip_none(annotation)
    text = meta["help"].replace("%", "%%")  # argparse %-formats help strings
    if kind is bool:
        if f.default is True:  # on by default: the flag (_flag's --no-<name>) turns it off
            return dict(action="store_false", default=True, help=f"disable: {text} (default: enabled)")
        return dict(action="store_true", default=False, help=f"{text} (default: off)")
    spec = {k: meta[k] for k in ("nargs", "const", "metavar") if k in meta}
    if get_origin(kind) is Literal:
        spec.update(choices=get_args(kind), type=type(get_args(kind)[0]))
    elif get_origin(kind) is tuple:
        item = get_args(kind)[0]
        spec["type"] = item if "nargs" in meta else _comma_list(item)
    elif kind in (int, float, str):
        spec["type"] = kind
    elif kind is dict or get_origin(kind) is dict:
        spec["type"] = json_object
    else:
        raise TypeError(f"{f.name}: no command-line form for {annotation!r} (give it cli=False)")
    if "default_text" in meta:
        shown = str(meta["default_text"])
    default = (
        f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else None
    )
    spec.update(default=default, help=f"{text} (default: {(shown or show(default)).replace('%', '%%')})")
    return spec


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


def json_object(text: str) -> dict[str, Any]:
    """An argparse ``type`` reading a JSON object (every ``dict[str, Any]`` option's, and hand-written parsers')."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"K\": 3}}', got {text!r}")
    return value


def show(value: Any) -> str:
    """A default as the help shows it: ``none``, ``a,b`` for tuples, JSON for dicts, else ``str``."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)
