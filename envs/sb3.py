"""A stable-baselines3 ``VecEnv`` over the native vector env (SB3 cannot take a gymnasium VectorEnv).

``SB3VecEnv(AVEVectorEnv(num_envs=N, ...))`` keeps the single batched model call per step. SB3's
conventions: ``reset()`` returns observations only; ``step_wait()`` returns ``(obs, rewards float32 [N],
dones bool [N], infos: list of N dicts)``; an ended episode is restarted at once, and its info carries
``"terminal_observation"`` (the last observation) and ``"TimeLimit.truncated"``, while the new episode's
reset info goes to ``reset_infos[i]`` (as ``DummyVecEnv`` does). ``env_method("action_masks")`` returns
one bool [A] mask per env for sb3-contrib's ``MaskablePPO``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from envs.vector import AVEVectorEnv
from envs.views import row_info

__all__ = ["SB3VecEnv"]

# Vector-env methods whose result has one entry per env (split per env by env_method).
_PER_ENV_METHODS = {"action_masks": "action_masks", "render": "frames"}


def _unbatch(infos: dict[str, Any], i: int) -> dict[str, Any]:
    """Env i's entries of a gymnasium vector info dict (only keys whose ``_key`` mask is set)."""
    rows = {
        k: v
        for k, v in infos.items()
        if not k.startswith("_")
        and k not in ("final_obs", "final_info")
        and infos.get(f"_{k}", np.ones(len(v), dtype=bool))[i]
    }
    return row_info(rows, i)


class SB3VecEnv(VecEnv):
    """stable-baselines3 adapter of :class:`envs.vector.AVEVectorEnv` (numpy observations).

    Args:
        venv: the vector environment, an :class:`AVEVectorEnv` with ``torch_obs=False`` and same-step
            autoreset (anything else raises ValueError).
    """

    def __init__(self, venv: gym.vector.VectorEnv) -> None:
        if not isinstance(venv, AVEVectorEnv):
            raise ValueError(
                f"SB3VecEnv wraps an envs.vector.AVEVectorEnv, got {type(venv).__name__}: "
                f"build one with AVEVectorEnv(num_envs=N, ...) or gym.make_vec(id, num_envs=N)"
            )
        if venv.torch_obs:
            raise ValueError("stable-baselines3 needs numpy observations: make the vector env with torch_obs=False")
        if venv.autoreset_mode is not AutoresetMode.SAME_STEP:  # SB3 restarts in the ending step, as same-step
            raise ValueError(
                f"SB3VecEnv needs the vector env's same-step autoreset, got {venv.autoreset_mode}: "
                "make it with autoreset_mode='same_step' (the default)"
            )
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    @classmethod
    def make(cls, env_id: str, num_envs: int, **kwargs: Any) -> SB3VecEnv:
        """``SB3VecEnv(gym.make_vec(env_id, num_envs, **kwargs))``."""
        return cls(gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs).unwrapped)

    # --------------------------------------------------------------- stepping
    def reset(self) -> VecEnvObs:
        seeds = None if all(s is None for s in self._seeds) else self._seeds
        indices = [opt.get("index") for opt in self._options]
        unknown = sorted({k for opt in self._options for k in opt} - {"index"})
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; allowed: ['index']")
        options = {"index": indices} if any(i is not None for i in indices) else None
        obs, infos = self.venv.reset(seed=seeds, options=options)
        self.reset_infos = [_unbatch(infos, i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise ValueError("step_wait() without step_async(actions)")
        actions, self._actions = self._actions, None
        obs, rewards, terminated, truncated, infos = self.venv.step(actions)
        dones = terminated | truncated
        out: list[dict[str, Any]] = []
        for i in range(self.num_envs):
            if dones[i]:
                info = _unbatch(infos["final_info"], i)
                info["terminal_observation"] = infos["final_obs"][i]
                info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                self.reset_infos[i] = _unbatch(infos, i)
            else:
                info = _unbatch(infos, i)
            out.append(info)
        return obs, rewards.astype(np.float32), dones.astype(bool), out

    def close(self) -> None:
        self.venv.close()

    # ---------------------------------------------------------- env access
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The vector env's attribute, once per requested env (the envs share one engine)."""
        value = getattr(self.venv, attr_name)  # AttributeError when absent: has_attr relies on it
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the vector env; only for all envs at once (they share one engine)."""
        if list(self._get_indices(indices)) != list(range(self.num_envs)):
            raise ValueError(
                f"the {self.num_envs} envs share one engine: "
                f"set_attr({attr_name!r}) applies to all of them (indices=None)"
            )
        setattr(self.venv, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call a vector-env method. ``action_masks`` and ``render`` give each env its own result
        (bool [A] / a frame); any other method is called once and its result given for every env."""
        idx = list(self._get_indices(indices))
        if method_name in _PER_ENV_METHODS:
            result = getattr(self.venv, _PER_ENV_METHODS[method_name])(*method_args, **method_kwargs)
            return [result[i] for i in idx]
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in idx]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Always False: the native vector env has no per-env gymnasium wrappers."""
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return list(self.venv.frames())

    def action_masks(self) -> np.ndarray:
        """bool [N, A] masks of all envs."""
        return self.venv.action_masks()
