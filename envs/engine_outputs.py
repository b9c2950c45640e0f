"""What the environments read off an :class:`envs.engine.AVEEngine`: observations and infos, computed only for
the keys asked for, and moved in one transfer.

:meth:`EngineOutputs.observation` and :meth:`EngineOutputs.info` return *raw* dicts: device tensors for what
the device holds (canvas, maps, belief, predictions) and fresh NumPy arrays for what the host holds (steps,
boxes, masks, FLOPs). An env gathers the raw dicts of a step (observations, infos, rewards, the ending
episodes' ones) and converts them all at once with :func:`avex.transfer.tree_to_host` (one device-to-host
copy) or :func:`avex.transfer.tree_to_device` (one non-blocking host-to-device copy, ``torch_obs``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from avex.cache import TokenCache
from avex.transfer import send, tree_to_device, tree_to_host
from envs.engine_setup import EngineSetup

__all__ = ["EngineOutputs"]


def _fresh_rows(t: torch.Tensor, i: slice | torch.Tensor) -> torch.Tensor:
    """A fresh copy of rows ``i`` of ``t`` (indexing with a tensor copies already; a slice is cloned)."""
    return t.clone() if isinstance(i, slice) else t[i]


class EngineOutputs(EngineSetup):
    """Observations, infos, masks and frames of the engine's rows (the base of :class:`envs.engine.AVEEngine`,
    which holds the state read here)."""

    batch_size: int
    cache: TokenCache
    hidden: torch.Tensor
    seen: torch.Tensor
    visited: torch.Tensor
    labels: torch.Tensor
    probs: torch.Tensor
    cls: torch.Tensor
    pred: torch.Tensor
    used: np.ndarray
    repeated: np.ndarray
    boxes: np.ndarray
    index_np: np.ndarray
    skipped_np: np.ndarray
    started: np.ndarray
    _used_t: torch.Tensor | None

    @property
    def steps(self) -> np.ndarray:  # AVEEngine's
        raise NotImplementedError

    @property
    def entropy(self) -> torch.Tensor:  # AVEEngine's (lazy)
        raise NotImplementedError

    def device_rows(self, rows: np.ndarray) -> slice | torch.Tensor:  # AVEEngine's
        raise NotImplementedError

    def _index(self, rows: np.ndarray | None) -> tuple[np.ndarray, slice | torch.Tensor]:
        """Host and device index of some rows (None: all)."""
        if rows is None:
            return np.arange(self.batch_size), slice(None)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return rows, self.device_rows(rows)

    # ------------------------------------------------------------ observations
    def observation(self, rows: np.ndarray | None = None) -> dict[str, Any]:
        """The raw observation of some rows (None: all): only the keys of ``config.obs_keys`` are computed.

        Returns:
            {"canvas": uint8 [R, H, W, C] revealed pixels (unseen = 0), "visited": uint8 [R, gh, gw],
            "step": int64 [R, 1] (NumPy: the host holds it), "probs": float32 [R, classes], "cls": float32
            [R, D], "entropy": float32 [R, gh, gw]} restricted to those keys; fresh copies, tensors on the
            model's device. Reading "entropy" computes a pending map (:attr:`AVEEngine.entropy`).
        """
        host, i = self._index(rows)

        with torch.inference_mode():
            make = {
                "canvas": lambda: self.hidden[i] * self.seen[i].unsqueeze(-1),
                "visited": lambda: self.visited[i].to(torch.uint8),
                "step": lambda: self.steps[host].astype(np.int64)[:, None],
                "probs": lambda: _fresh_rows(self.probs, i),
                "cls": lambda: _fresh_rows(self.cls, i),
                "entropy": lambda: _fresh_rows(self.entropy, i),
            }
            return {k: make[k]() for k in self.config.observed}

    def observe(self, rows: np.ndarray | None = None, as_torch: bool = False) -> dict[str, Any]:
        """:meth:`observation` converted: NumPy arrays (one transfer), or tensors on the model's device."""
        obs = self.observation(rows)
        return tree_to_device(obs, self.device) if as_torch else tree_to_host(obs)

    # ------------------------------------------------------------------- infos
    def info(self, rows: np.ndarray | None = None, device_masks: bool = False) -> dict[str, Any]:
        """The raw batched info of some rows (None: all); see the environment's docstring for the keys.

        Args:
            device_masks: compute ``action_mask`` on the device (for ``torch_obs``: no host-to-device copy of
                [R, A] masks) instead of on the host.

        Returns:
            "prediction", "correct" and "label" as tensors on the model's device (and "action_mask" with
            ``device_masks``), the other keys as fresh NumPy arrays.
        """
        host, i = self._index(rows)
        every = rows is None

        def rows_of(a: np.ndarray) -> np.ndarray:  # a fresh copy (every row: a plain copy, faster than indexing)
            return a.copy() if every else a[host]

        with torch.inference_mode():
            pred, label = _fresh_rows(self.pred, i), _fresh_rows(self.labels, i)
            mask = self._device_masks(i) if device_masks else self._host_masks(host, every)
            t = rows_of(self.steps)
            budget = self.boxes.shape[1]
            box = self.boxes.reshape(-1, 4).take(host * budget + np.maximum(t - 1, 0), axis=0)  # each row's last box
            box[t == 0] = np.nan  # no glimpse yet
            return {
                "prediction": pred,
                "correct": pred == label,
                "label": label,
                "index": rows_of(self.index_np),
                "step_flops": self.flops_per_step.take(t),
                "cumulative_flops": self.flops_cumulative.take(t),
                "glimpse_box": box,
                "action_mask": mask,
                "skipped_images": rows_of(self.skipped_np),
                "repeated": rows_of(self.repeated),
            }

    def infos(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """:meth:`info` as NumPy arrays (one transfer)."""
        return tree_to_host(self.info(rows))

    def _masks_all_true(self) -> bool:
        return self.config.action_mode == "continuous" or self.config.allow_repeats

    def _host_masks(self, rows: np.ndarray, every: bool) -> np.ndarray:
        """int8 [R, A] action masks on the host."""
        if self._masks_all_true():
            return np.ones((rows.size, self.num_actions), dtype=np.int8)
        return (~(self.used if every else self.used[rows])).view(np.int8)

    def _device_masks(self, i: slice | torch.Tensor) -> torch.Tensor:
        """int8 [R, A] action masks on the device, from a device copy of ``used`` (sent once, then kept in step
        by the engine)."""
        if self._masks_all_true():
            n = self.batch_size if isinstance(i, slice) else i.numel()
            return torch.ones((n, self.num_actions), dtype=torch.int8, device=self.device)
        if self._used_t is None:
            self._used_t = send(self.used.copy(), self.device)
        return (~self._used_t[i]).to(torch.int8)

    def action_masks(self) -> np.ndarray:
        """bool [B, A]: False at positions taken this episode (advice, or a refusal with ``strict``); all True in
        continuous mode or with ``allow_repeats``."""
        if self._masks_all_true():
            return np.ones((self.batch_size, self.num_actions), dtype=bool)
        return ~self.used

    # ------------------------------------------------------------------ frames
    def frame(self, row: int = 0) -> np.ndarray:
        """An RGB picture of one row's episode: uint8 [H', W', 3] (see :func:`envs.render.render_frame`)."""
        from envs.render import render_frame  # drawing code only when asked for

        t = int(self.steps[row])
        return render_frame(
            hidden=self.hidden[row].cpu().numpy(),
            seen=self.seen[row].cpu().numpy(),
            boxes=self.boxes[row, :t],
            probs=self.probs[row].float().cpu().numpy(),
            class_names=self.class_names,
            label=int(self.labels[row]) if self.started[row] else None,
        )
