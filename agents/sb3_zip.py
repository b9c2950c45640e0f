"""A stable-baselines3 ``.zip`` (``model.save(...)``) read as an avex policy, never unpickled.

SB3's archive holds ``data`` (JSON in which every non-JSON value is a base64 cloudpickle string under
``":serialized:"``, next to readable fields such as ``":type:"``, shapes and ``str()`` of classes) and
``policy.pth`` (the policy's state dict, written by ``torch.save``). This module reads only:

- the plain JSON fields of ``data`` (``":serialized:"`` strings are never decoded): the policy class, its
  ``policy_kwargs``, the observation keys and the action space, which must be avex's architecture
  (:data:`agents.sb3_policy.POLICY_KWARGS`, maskable for discrete glimpses);
- ``policy.pth``, with ``torch.load(weights_only=True)``, PyTorch's tensors-only reader that refuses any
  pickled object other than tensors and plain containers (no code runs). Like :mod:`avex.convert`, this is
  the one exception to avex's safetensors-only rule, and it is only as trusted as that reader.

The policy is then rebuilt with :func:`agents.sb3_policy.build_policy` for the env's spaces and loaded
strictly (:func:`avex.safeload.load_state`). Optimizer state and ``pytorch_variables.pth`` are not read.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy

from agents.belief import BELIEF_KEYS, INK
from agents.sb3_policy import POLICY_KWARGS, build_policy, policy_class
from avex.checks import brief
from avex.safeload import check_file, load_state

__all__ = ["SB3_ZIP_FORMAT", "load_sb3_zip", "read_sb3_zip"]

SB3_ZIP_FORMAT = "sb3-zip"  # the "format" of a loaded .zip policy's meta
_MAX_DATA_BYTES = 16 * 2**20  # SB3's data JSON is tens of kB
_MAX_POLICY_BYTES = 2**30  # avex's policy is a few MB; a member this large is not one
_PICKLED = (":type:", ":serialized:")  # SB3's keys of a cloudpickled value; only ":type:" is ever read
_FOREIGN = "train it with policy_kwargs=agents.sb3_policy.POLICY_KWARGS on agents.belief.BeliefObservation(env)"


def _member(archive: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """One member's bytes, read at most ``limit`` bytes far (a declared size can lie)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise ValueError(
            f"{path} has no {name!r}: is it a stable-baselines3 model saved by model.save()? "
            f"(it holds {brief(archive.namelist())})"
        ) from None
    if info.file_size > limit:
        raise ValueError(f"{path}: {name!r} is {info.file_size} bytes, more than any avex policy needs ({limit})")
    with archive.open(info) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{path}: {name!r} holds more than {limit} bytes")
    return raw


def read_sb3_zip(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The plain JSON of an SB3 archive's ``data`` and the tensors of its ``policy.pth``; nothing unpickled.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a regular file, not a zip archive, no ``data`` or ``policy.pth``, a ``data`` that is
            not a JSON object, or a ``policy.pth`` that ``torch.load(weights_only=True)`` refuses (any pickled
            object but tensors and containers) or that is not a flat state dict of tensors.
    """
    path = check_file(Path(path), "stable-baselines3 model")
    try:
        with zipfile.ZipFile(path) as archive:
            data_raw = _member(archive, "data", _MAX_DATA_BYTES, path)
            policy_raw = _member(archive, "policy.pth", _MAX_POLICY_BYTES, path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as err:
        raise ValueError(f"{path} is not a zip archive saved by stable-baselines3's model.save(): {err}") from err
    try:
        data = json.loads(data_raw)  # the JSON text only: ":serialized:" strings stay strings
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: 'data' is not JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: 'data' must hold a JSON object, got {type(data).__name__}")
    try:
        state = torch.load(io.BytesIO(policy_raw), map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler and torch raise many types for what they refuse
        raise ValueError(
            f"{path}: cannot read 'policy.pth' with torch.load(weights_only=True), which reads tensors only: "
            f"{type(err).__name__}: {brief(str(err))}"
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: 'policy.pth' is not a state dict of tensors (got {type(state).__name__})")
    return data, state


def _readable(value: Any) -> dict[str, Any]:
    """The readable fields SB3 stored for a value: all of a plain JSON object, or those beside a pickle."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if k not in _PICKLED}


def _as_saved(value: Any) -> Any:
    """A POLICY_KWARGS value as SB3's JSON holds it: classes as ``str()``, tuples as lists."""
    return json.loads(json.dumps(value, default=str))


def _class_name(saved: Any) -> str | None:
    """``module.Class`` of a saved class, from its readable ``__module__`` and ``__init__`` fields."""
    fields = _readable(saved)
    match = re.match(r"<function ([\w.]+)\.__init__ at ", str(fields.get("__init__", "")))
    if "__module__" not in fields or match is None:
        return None
    return f"{fields['__module__']}.{match.group(1)}"


def _check_architecture(data: dict[str, Any], path: Path, action_space: spaces.Space[Any]) -> bool:
    """Refuse a saved model whose policy is not avex's for this action space, naming what differs; return whether
    it reads the ink map (:data:`agents.belief.INK`)."""
    continuous = isinstance(action_space, spaces.Box)
    saved_action = data.get("action_space")
    saved_type = str(saved_action.get(":type:", "")) if isinstance(saved_action, dict) else ""
    kinds = {"gymnasium.spaces.box.Box": "continuous", "gymnasium.spaces.discrete.Discrete": "discrete"}
    trained = next((kind for name, kind in kinds.items() if f"'{name}'" in saved_type), None)
    if trained is None:
        raise ValueError(f"{path}: its action space {saved_type or 'is missing'}: avex policies act on Discrete or Box")
    if (trained == "continuous") != continuous:
        raise ValueError(f"policy {path} was trained for {trained} actions; this env's are {action_space}")
    n = _readable(saved_action).get("n")
    if isinstance(action_space, spaces.Discrete) and str(n) != str(int(action_space.n)):
        raise ValueError(f"policy {path} was trained for {n} glimpse positions; this env has {action_space.n}")
    problems: list[str] = []
    want = policy_class(continuous)
    want_name = f"{want.__module__}.{want.__qualname__}"
    got_name = _class_name(data.get("policy_class"))
    if got_name != want_name:
        problems.append(f"policy class {got_name or 'unknown'} (avex's: {want_name}, 'MultiInputPolicy')")
    saved_kwargs, avex_kwargs = _readable(data.get("policy_kwargs")), _as_saved(POLICY_KWARGS)
    for key in sorted(saved_kwargs.keys() | avex_kwargs.keys()):
        if saved_kwargs.get(key, "<unset>") != avex_kwargs.get(key, "<unset>"):
            saved, ours = saved_kwargs.get(key, "<unset>"), avex_kwargs.get(key, "<unset>")
            problems.append(f"policy_kwargs[{key!r}] {brief(saved)} (avex's: {ours})")
    if data.get("use_sde"):
        problems.append("use_sde=True (avex's: False)")
    saved_keys = re.findall(r"'(\w+)': ", str(_readable(data.get("observation_space")).get("spaces", "")))
    missing = [k for k in BELIEF_KEYS if k not in saved_keys]
    if missing:
        problems.append(f"observation keys {saved_keys or 'unknown'} lack {missing}")
    if problems:
        raise ValueError(f"{path} is not an avex-architecture policy: {'; '.join(problems)}. To load it, {_FOREIGN}")
    return INK in saved_keys


def load_sb3_zip(
    path: str | Path, observation_space: spaces.Space[Any], action_space: spaces.Space[Any]
) -> tuple[BasePolicy, dict[str, Any]]:
    """Rebuild the policy of a MaskablePPO / PPO ``.zip`` for an env's spaces; return it and its meta.

    Only avex's architecture loads (``MultiInputPolicy`` with :data:`agents.sb3_policy.POLICY_KWARGS`,
    trained on the belief keys, with or without the ink map); ``data``'s pickled fields are never decoded and
    ``policy.pth`` is read with ``torch.load(weights_only=True)`` (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an SB3 archive, pickled objects in ``policy.pth``, another architecture (the message
            names what differs), or weights that do not fit the env's spaces.
    """
    path = Path(path)
    data, state = read_sb3_zip(path)
    ink = _check_architecture(data, path, action_space)
    policy = build_policy(observation_space, action_space, ink)
    load_state(policy, state, f"policy {path}")
    meta = dict(
        format=SB3_ZIP_FORMAT,
        source=str(path),
        continuous=isinstance(action_space, spaces.Box),
        num_timesteps=data.get("num_timesteps"),
    )
    return policy, meta
