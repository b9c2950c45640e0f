"""The native vector AVE environment: N episodes stepped by ONE batched model call.

Built by ``gym.make_vec(id, num_envs=N)`` (the ids' ``vector_entry_point``). Two of Gymnasium's autoreset
modes (``autoreset_mode=``, also in ``metadata["autoreset_mode"]``), each exactly as ``SyncVectorEnv`` in
that mode:

* ``AutoresetMode.SAME_STEP`` (default): the step that ends an episode returns the NEXT episode's first
  observation, with the last observation in ``infos["final_obs"]`` and the last info in ``infos["final_info"]``.
* ``AutoresetMode.NEXT_STEP`` (what Gymnasium's vector wrappers such as ``FlattenObservation`` need): the step
  that ends an episode returns its last observation; the next step ignores that env's action, starts its next
  episode and returns the first observation and reset info, reward 0, terminated and truncated False.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from avex.checks import brief
from avex.transfer import fill_rows, tree_to_device, tree_to_host
from envs.config import EnvConfig, check_flag, check_int, check_options, check_seed
from envs.engine import AVEEngine
from envs.views import EngineViews

__all__ = ["AVEVectorEnv"]


def _masked_infos(
    rows_info: dict[str, Any], rows: np.ndarray | None, n: int, index: slice | torch.Tensor | None = None
) -> dict[str, Any]:
    """Spread the infos of some rows over all n envs: each key gets an [n, ...] array (zeros elsewhere) and a
    ``_key`` mask.

    Args:
        rows_info: raw infos (NumPy arrays and device tensors) of the rows, in their order.
        rows: int [R] ascending rows, or None for all n envs (nothing to spread).
        index: the rows' device index (:meth:`AVEEngine.device_rows`), for the tensors.
    """
    out: dict[str, Any] = {}
    mask = np.zeros(n, dtype=bool)
    mask[slice(None) if rows is None else rows] = True
    every = rows is None or rows.size == n
    for key, value in rows_info.items():
        if every:
            full = value
        elif isinstance(value, torch.Tensor):
            assert index is not None, "a tensor is spread with the rows' device index"
            full = value.new_zeros((n, *value.shape[1:]))
            full[index] = value
        else:
            full = np.zeros((n, *value.shape[1:]), dtype=value.dtype)
            full[rows] = value
        out[key] = full
        out[f"_{key}"] = mask.copy()
    return out


def _take_rows(values: dict[str, Any], rows: np.ndarray, index: slice | torch.Tensor) -> dict[str, Any]:
    """Some rows of raw values (NumPy arrays and device tensors): fresh copies, or the values for every row."""
    return {k: v[index] if isinstance(v, torch.Tensor) else v[rows] for k, v in values.items()}


def _put_rows(
    values: dict[str, Any], fresh: dict[str, Any], rows: np.ndarray, index: slice | torch.Tensor
) -> dict[str, Any]:
    """Copies of raw values with some rows replaced by ``fresh`` (``values`` is not changed)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(index, slice):  # every row
            out[k] = fresh[k]
            continue
        out[k] = v.clone() if isinstance(v, torch.Tensor) else v.copy()
        out[k][index if isinstance(v, torch.Tensor) else rows] = fresh[k]
    return out


# The modes implemented, by their spellings lower-cased: the enum's name ("next_step") and value ("nextstep").
_MODES = {
    spelling: mode
    for mode in (AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP)
    for spelling in (mode.name.lower(), mode.value.lower())
}


def _autoreset_mode(value: Any) -> AutoresetMode:
    """An autoreset mode the native env implements, from the enum, its name or its value (any case)."""
    if isinstance(value, AutoresetMode):
        value = value.name
    mode = _MODES.get(value.lower()) if isinstance(value, str) else None
    if mode is None:
        raise ValueError(
            "autoreset_mode must be AutoresetMode.SAME_STEP or AutoresetMode.NEXT_STEP (or 'same_step', "
            f"'next_step'), got {brief(value)}"
        )
    return mode


class AVEVectorEnv(EngineViews, gym.vector.VectorEnv):
    """N AVE environments in one batch: see :class:`envs.ave_env.AVEEnv` for the task, spaces and kwargs.

    Env ``i`` behaves exactly like a single ``AVEEnv`` reset with seed ``seed + i`` (same canvases,
    observations, rewards and flags up to float rounding), because both run the same
    :class:`envs.engine.AVEEngine` code and each env draws its canvases from its own generator.

    Args:
        num_envs: N.
        autoreset_mode: ``AutoresetMode.SAME_STEP`` (default) or ``AutoresetMode.NEXT_STEP``, or their names
            (``"same_step"``, ``"next_step"``, or the values ``"SameStep"``, ``"NextStep"``); see the module.
        render_mode: None or "rgb_array" (``render()`` then returns one frame per env).
        max_episode_steps: truncate episodes after this many glimpses if fewer than ``budget``
            (``gym.make_vec`` passes the spec's value); None: episodes end at ``budget``.
        torch_obs: return every per-env array (observations, rewards, terminated, truncated and each info
            array, ``_key`` masks and ``final_info`` included) as a torch tensor on the model's device, of the
            NumPy dtype: not standard Gymnasium, for RL loops that stay on the GPU. ``infos["final_obs"]`` is
            then the batched observation dict of the ending step (rows where ``_final_obs``).
            :meth:`action_masks` stays NumPy (sb3-contrib reads it).
        **kwargs: the environment arguments (:class:`envs.engine.EnvConfig`).

    ``reset(seed=s)`` seeds env ``i`` with ``s + i`` (or a list of N seeds); ``reset(options=...)`` takes
    ``"reset_mask"`` (bool [N]: reset only those envs, the others keep their episodes) and ``"index"``
    (one image index for every reset env, or a sequence of N entries, None = draw).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2, "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        *,
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
        torch_obs: bool = False,
        autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP,
        **kwargs: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.config = EnvConfig.from_kwargs(**kwargs)
        if max_episode_steps is not None:
            check_int("max_episode_steps", max_episode_steps, 1, why=" or None")
        check_flag("torch_obs", torch_obs)
        mode = _autoreset_mode(autoreset_mode)
        self.engine = AVEEngine(self.config, num_envs)
        self.num_envs = self.engine.batch_size
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps
        self.torch_obs = bool(torch_obs)
        self.single_observation_space = self.engine.observation_space
        self.single_action_space = self.engine.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._rngs: list[np.random.Generator | None] = [None] * self.num_envs
        self.autoreset_mode = mode
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}  # Gymnasium's wrappers read the instance's
        self._pending = np.zeros(self.num_envs, dtype=bool)  # next-step mode: envs whose episode ended last step

    @property
    def env_rngs(self) -> list[np.random.Generator | None]:
        """Each env's own generator (None until its first reset)."""
        return list(self._rngs)

    # ------------------------------------------------------------------ reset
    def _reset_mask(self, options: dict[str, Any]) -> np.ndarray:
        mask = options.get("reset_mask")
        if mask is None:
            return np.ones(self.num_envs, dtype=bool)
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (self.num_envs,) or not mask.any():
            raise ValueError(
                f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) with at least one True, "
                f"got {mask.dtype} {mask.shape}: {brief(mask)}"
            )
        return mask

    def _indices(self, options: dict[str, Any], rows: np.ndarray) -> list[int | None] | None:
        index = options.get("index")
        if index is None:
            return None
        if isinstance(index, (int, np.integer)) and not isinstance(index, (bool, np.bool_)):
            per_env = [index] * self.num_envs
        elif isinstance(index, (Sequence, np.ndarray)) and not isinstance(index, str) and len(index) == self.num_envs:
            per_env = list(index)
        else:
            raise ValueError(
                f"options['index'] must be one int or a sequence of {self.num_envs} (int or None), got {brief(index)}"
            )
        return [None if per_env[i] is None else self.engine.check_index(per_env[i]) for i in rows]

    def _seeds(self, seed: Any) -> list[int | None]:
        """One seed per env (each None or an int >= 0), all checked before any env is touched."""
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
            first = check_seed(seed)
            assert first is not None
            return [first + i for i in range(self.num_envs)]
        if not isinstance(seed, (Sequence, np.ndarray)) or isinstance(seed, str) or len(seed) != self.num_envs:
            raise ValueError(
                f"seed must be None, an int >= 0 or a list of {self.num_envs} seeds (int >= 0 or None), "
                f"got {brief(seed)}"
            )
        return [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]

    def _rng(self, i: int | np.integer) -> np.random.Generator:
        """Env ``i``'s generator; it exists from the env's first reset (step() refuses envs never reset)."""
        rng = self._rngs[i]
        if rng is None:
            raise RuntimeError(f"env {i} has no generator yet: call reset() first")
        return rng

    def _rngs_of(self, rows: np.ndarray) -> list[np.random.Generator]:
        """The generators of some envs, each started (a list of every env's without a loop when all restart)."""
        if rows.size == self.num_envs and self.engine.started.all():  # started: reset once, so a generator each
            return cast(list[np.random.Generator], self._rngs)
        return [self._rng(i) for i in rows]

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reset all envs, or those in ``options["reset_mask"]``; returns every env's observation and the
        reset envs' infos (``_key`` masks mark them)."""
        options = check_options(options, ["index", "reset_mask"])
        rows = np.flatnonzero(self._reset_mask(options))
        indices = self._indices(options, rows)
        seeds = self._seeds(seed)
        # Everything validated. New generators are committed only once the engine has reset with them, so
        # a fault while drawing (every image unreadable) leaves every env's generator as it was.
        fresh = {int(i): seeding.np_random(seeds[i])[0] for i in rows if seeds[i] is not None or self._rngs[i] is None}
        self.engine.reset_rows(rows, [fresh[int(i)] if int(i) in fresh else self._rng(i) for i in rows], indices)
        for i, rng in fresh.items():
            self._rngs[i] = rng
        self._pending[rows] = False
        if isinstance(seed, (int, np.integer)):
            super().reset(seed=seeds[0])
        out = self._convert(dict(obs=self.engine.observation(), infos=self._infos(rows)))
        return out["obs"], out["infos"]

    # ------------------------------------------------------------------- step
    def step(self, actions: Any) -> tuple[dict[str, Any], Any, Any, Any, dict[str, Any]]:
        """One glimpse in every env (one model call); ended episodes restart as :attr:`autoreset_mode` says.

        The step waits for the device once, for the one copy of its NumPy outputs; with ``torch_obs`` never
        (pass the actions as NumPy: a device tensor of actions is copied to the host, where they are checked).

        Returns:
            observations, rewards float64 [N], terminated bool [N], truncated bool [N], infos (NumPy arrays, or
            tensors with ``torch_obs``). A refused batch of actions (ValueError) changes nothing.
        """
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu().numpy()
        if self.autoreset_mode is AutoresetMode.NEXT_STEP:
            raw = self._step_next(actions)
        else:
            raw = self._step_same(actions)
        out = self._convert(raw)
        infos = out["infos"]
        if "final_obs" in infos and not self.torch_obs:
            # Gymnasium's convention: an object array of per-env observations (NumPy views: cheap).
            done = np.flatnonzero(infos["_final_obs"])
            final_obs = np.full(self.num_envs, None, dtype=object)
            for j, i in enumerate(done):
                final_obs[i] = {k: v[j] for k, v in infos["final_obs"].items()}
            infos["final_obs"] = final_obs
        return out["obs"], out["reward"], out["terminated"], out["truncated"], infos

    def _truncated(self, terminated: np.ndarray) -> np.ndarray:
        steps = self.engine.steps
        limit = self.max_episode_steps
        return (steps >= limit) & ~terminated if limit else np.zeros_like(terminated)

    def _infos(self, rows: np.ndarray | None = None) -> dict[str, Any]:
        """The raw infos of some rows (None: all), spread over every env with ``_key`` masks."""
        raw = self.engine.info(rows, device_masks=self.torch_obs)
        index = None if rows is None else self.engine.device_rows(rows)
        return _masked_infos(raw, rows, self.num_envs, index)

    def _step_next(self, actions: Any) -> dict[str, Any]:
        """Next-step autoreset: envs that ended last step start their next episode and ignore their action."""
        pending = np.flatnonzero(self._pending)
        a = self.engine.parse_actions(actions, ignore=self._pending)  # refused here: nothing has changed
        if pending.size:
            self.engine.reset_rows(pending, self._rngs_of(pending))
        # One batched call for every row: the restarted rows take a placeholder glimpse that is undone below,
        # which costs less than splitting the batch.
        rewards, terminated = self.engine.step(a)
        rewards = rewards.double()
        if pending.size:
            self.engine.clear_rows(pending)
            fill_rows(rewards, self.engine.device_rows(pending), 0.0)
            terminated[pending] = False
        truncated = self._truncated(terminated)
        self._pending = terminated | truncated
        obs = self.engine.observation()
        return dict(obs=obs, reward=rewards, terminated=terminated, truncated=truncated, infos=self._infos())

    def _step_same(self, actions: Any) -> dict[str, Any]:
        """Same-step autoreset: ended envs restart at once; their last observation and info go in the infos."""
        eng = self.engine
        rewards, terminated = eng.step(actions)
        truncated = self._truncated(terminated)
        obs = eng.observation()
        infos = self._infos()
        raw = dict(obs=obs, reward=rewards.double(), terminated=terminated, truncated=truncated, infos=infos)
        done = np.flatnonzero(terminated | truncated)
        if not done.size:
            return raw
        index = eng.device_rows(done)
        # The ending rows' last observation: batched, every row, with torch_obs (a per-env dict is slow at many
        # thousand envs); else only the ending rows, made per-env dicts after the transfer.
        final_obs = obs if self.torch_obs else _take_rows(obs, done, index)
        values = {k: v for k, v in infos.items() if not k.startswith("_")}
        final_info = _masked_infos(_take_rows(values, done, index), done, self.num_envs, index)
        eng.reset_rows(done, self._rngs_of(done))
        raw["obs"] = _put_rows(obs, eng.observation(done), done, index)
        infos.update(_put_rows(values, eng.info(done, device_masks=self.torch_obs), done, index))
        mask = np.zeros(self.num_envs, dtype=bool)
        mask[done] = True
        infos.update(final_obs=final_obs, _final_obs=mask, final_info=final_info, _final_info=mask.copy())
        return raw

    def _convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Raw outputs in one transfer: every array a tensor on the model's device with ``torch_obs``, else every
        tensor a NumPy array."""
        return tree_to_device(raw, self.engine.device) if self.torch_obs else tree_to_host(raw)

    # ---------------------------------------------------------------- extras
    def action_masks(self) -> np.ndarray:
        """bool [N, A]: allowed discrete actions of every env (for sb3-contrib's MaskablePPO)."""
        return self.engine.action_masks()

    def frames(self) -> tuple[np.ndarray, ...]:
        """One uint8 [H', W', 3] frame per env (see :meth:`envs.ave_env.AVEEnv.frame`)."""
        return tuple(self.engine.frame(i) for i in range(self.num_envs))

    def render(self) -> tuple[np.ndarray, ...] | None:
        """:meth:`frames` when ``render_mode="rgb_array"``, else None (with a warning)."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render mode: make the env with render_mode='rgb_array'")
            return None
        return self.frames()
