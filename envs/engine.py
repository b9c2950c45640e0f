"""The batched AVE engine shared by the single environment (B=1) and the vector environment (B=N).

One :class:`AVEEngine` holds B independent episodes: hidden canvases, what each has revealed, the TORE
token cache and the last model outputs. Every tensor operation is batched over the rows on the model's
device under ``torch.inference_mode()``; the single and the vector environment are thin adapters over
it, so they agree by construction. Its fixed part (source, model, geometry, spaces) is built by
:class:`envs.engine_setup.EngineSetup`; what the environments read off it is in :mod:`envs.views`.

Shapes: B rows, H x W x C canvas, (gh, gw) patch grid, A discrete glimpse positions, D embedding width,
classes = the data source's number of classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from avex.checkpoint import built_digest, weights_digest
from avex.checks import brief
from avex.geometry import GlimpseGeometry
from envs.config import EnvConfig, check_int
from envs.engine_setup import EngineSetup
from envs.rewards import Belief

__all__ = ["AVEEngine"]


def _visited(geometry: GlimpseGeometry, boxes: torch.Tensor) -> torch.Tensor:
    """``geometry.visited_patches`` of a batch of torch boxes: bool [B, gh, gw] on their device."""
    visited = geometry.visited_patches(boxes)
    assert isinstance(visited, torch.Tensor), "visited_patches returns torch for torch boxes"
    return visited


class AVEEngine(EngineSetup):
    """B independent AVE episodes over one shared model, stepped together.

    Args:
        config: the environment's arguments.
        batch_size: number of rows B.

    Attributes:
        model, source, geometry: the shared TORE model, the canvas source, the glimpse geometry.
        K: the split in use. observation_space / action_space: the spaces of ONE row.
    """

    def __init__(self, config: EnvConfig, batch_size: int) -> None:
        self.config = config
        self.batch_size = check_int("num_envs", batch_size, 1)
        self._build()
        self._alloc()

    # ----------------------------------------------------------- per-row state
    def _alloc(self) -> None:
        """Per-row state: tensors on the model's device, bookkeeping on the host."""
        B, cfg, dev = self.batch_size, self.config, self.device
        h, w, c = self.source.canvas_shape
        gh, gw = self.geometry.grid
        with torch.inference_mode():
            self.cache = self.model.init_cache(B, cfg.budget, self.K, self.geometry.tokens_per_glimpse, device=dev)
            self.hidden = torch.zeros(B, h, w, c, dtype=torch.uint8, device=dev)
            self.seen = torch.zeros(B, h, w, dtype=torch.bool, device=dev)
            self.visited = torch.zeros(B, gh, gw, dtype=torch.bool, device=dev)
            self.labels = torch.zeros(B, dtype=torch.int64, device=dev)
            self.logits = self._empty_logits.expand(B, -1).clone()  # the belief the next reward starts from
            self.probs = self._empty_probs.expand(B, -1).clone()
            self.cls = self._empty_cls.expand(B, -1).clone()
            self.entropy = self._empty_entropy.expand(B, -1, -1).clone()
        self.used = np.zeros((B, self.num_actions), dtype=bool)
        self.repeated = np.zeros(B, dtype=bool)  # the last glimpse took a position already taken this episode
        self.boxes = np.full((B, cfg.budget, 4), np.nan, dtype=np.float32)
        self.labels_np = np.zeros(B, dtype=np.int64)
        self.index_np = np.zeros(B, dtype=np.int64)
        self.pred_np = np.full(B, self._empty_pred, dtype=np.int64)
        self.skipped_np = np.zeros(B, dtype=np.int64)  # unreadable files passed over drawing this episode's image
        self.started = np.zeros(B, dtype=bool)

    @property
    def steps(self) -> np.ndarray:
        """int64 [B] glimpses taken in each row's episode (the token cache's count)."""
        return self.cache.counts

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        """The episode state, the source's counters and the model's weights digest. The source and the model
        are rebuilt from the config on unpickling (the model exactly: see :func:`avex.checkpoint.shared_model`),
        so a model changed in place since it was built cannot be pickled.

        Raises:
            ValueError: the model's weights are no longer those its arguments build.
        """
        digest = weights_digest(self.model)
        if digest != built_digest(self.model):
            raise ValueError(
                "cannot pickle this environment: its model's weights were changed after it was built, and a "
                "pickle rebuilds the model from the environment's arguments; save the model with "
                "avex.checkpoint.save_tore and make the environment with checkpoint=<that file>"
            )
        state = {k: v for k, v in self.__dict__.items() if k not in _REBUILT}
        state["_source_state"] = {
            k: getattr(self.source, k) for k in ("skipped", "bad_files") if hasattr(self.source, k)
        }
        state["_model_digest"] = digest
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild source and model from the config, and refuse a model whose weights differ from the pickled one.

        Raises:
            ValueError: the rebuilt model differs (the checkpoint file changed, or another torch / timm).
        """
        source_state = state.pop("_source_state", {})
        digest = state.pop("_model_digest", None)
        self.__dict__.update(state)
        self._build()
        if digest is not None and weights_digest(self.model) != digest:
            raise ValueError(
                f"cannot unpickle this environment: the model its arguments give here "
                f"(checkpoint={self.config.checkpoint!r}, model={self.config.model!r}) has other weights than the "
                "pickled one (a checkpoint file changed, or another torch / timm version)"
            )
        for k, v in source_state.items():
            setattr(self.source, k, v)

    # ------------------------------------------------------------------- reset
    def check_index(self, index: Any) -> int:
        """Validate an image index of the split. Raises ValueError naming the range."""
        n = len(self.source)
        return check_int("options['index']", index, 0, n - 1, f" (an image of the {n} in this split)")

    @torch.inference_mode()
    def reset_rows(
        self,
        rows: Sequence[int] | np.ndarray,
        rngs: Sequence[np.random.Generator],
        indices: Sequence[int | None] | None = None,
    ) -> None:
        """Start new episodes in some rows (others untouched).

        Args:
            rows: int [R] rows to reset.
            rngs: one generator per reset row; row i's canvas is drawn with rngs[i] only.
            indices: optional image index per reset row (None: drawn).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return
        if indices is not None:
            indices = [None if i is None else self.check_index(i) for i in indices]
        # A source that decodes files reports, per row, the unreadable ones it passed over.
        counting = getattr(self.source, "sample_counting_skips", None)
        if counting is not None:
            canvases, labels, used_idx, skipped = counting(list(rngs), indices)
        else:
            (canvases, labels, used_idx), skipped = self.source.sample(list(rngs), indices), 0
        r = torch.as_tensor(rows, device=self.device)
        self.hidden[r] = canvases.to(self.device)
        self.labels[r] = labels.to(self.device)
        self.labels_np[rows] = labels.cpu().numpy()
        self.index_np[rows] = used_idx
        self.skipped_np[rows] = skipped
        self.started[rows] = True
        self.clear_rows(rows)

    @torch.inference_mode()
    def clear_rows(self, rows: np.ndarray) -> None:
        """Put some rows back to the start of their episode on the same image: nothing revealed, empty pass.

        Args:
            rows: int [R] rows (their canvas, label and image index stay).
        """
        r = torch.as_tensor(rows, device=self.device)
        self.seen[r] = False
        self.visited[r] = False
        self.model.reset_cache(self.cache, rows)
        n = len(rows)
        self.probs[r] = self._empty_probs.expand(n, -1)
        self.cls[r] = self._empty_cls.expand(n, -1)
        self.entropy[r] = self._empty_entropy.expand(n, -1, -1)
        self.logits[r] = self._empty_logits.expand(n, -1)
        self.used[rows] = False
        self.repeated[rows] = False
        self.boxes[rows] = np.nan
        self.pred_np[rows] = self._empty_pred

    # -------------------------------------------------------------------- step
    def parse_actions(self, actions: Any, ignore: np.ndarray | None = None) -> np.ndarray:
        """Validate a batch of actions without touching any state.

        Discrete: int [B] in 0..A-1 (with ``strict``, none the mask forbids). Continuous: float [B, 3]
        (y, x, z) in [0, 1].

        Args:
            actions: one action per row.
            ignore: bool [B], rows whose action is not read (the vector env's next-step autoreset): they get
                a placeholder that is valid on a fresh episode (position 0, or (0, 0, 0)).

        Returns:
            int64 [B] or float32 [B, 3]. Raises ValueError naming the problem and the valid range.
        """
        B = self.batch_size
        skip = np.zeros(B, dtype=bool) if ignore is None else np.asarray(ignore, dtype=bool)
        unready = np.flatnonzero(~self.started & ~skip)
        if unready.size:
            raise ValueError(f"call reset() before step(){self._rows_text(unready)}")
        over = np.flatnonzero((self.steps >= self.config.budget) & ~skip)
        if over.size:
            raise ValueError(
                f"the episode is over (budget of {self.config.budget} glimpses spent){self._rows_text(over)}: "
                "call reset()"
            )
        if self.config.action_mode == "discrete":
            return self._parse_discrete(actions, skip)
        a = np.asarray(actions)
        if a.shape != (B, 3) or a.dtype.kind not in "fiu":
            raise ValueError(
                f"expected {B} continuous action(s) (y, x, z) as floats of shape ({B}, 3), "
                f"got {a.dtype} shape {a.shape}: {brief(actions)}"
            )
        a = np.where(skip[:, None], 0, a)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"continuous actions (y, x, z) must lie in [0, 1], got {brief(a.tolist())}")
        return a.astype(np.float32)

    def _parse_discrete(self, actions: Any, skip: np.ndarray) -> np.ndarray:
        """:meth:`parse_actions` in discrete mode (``skip``: rows given the placeholder 0)."""
        B, a = self.batch_size, np.asarray(actions)
        if a.shape != (B,):
            raise ValueError(f"expected {B} discrete action(s) (shape ({B},)), got shape {a.shape}: {brief(actions)}")
        if a.dtype.kind not in "iu":  # checked here too: the geometry's message would quote a whole string
            A, (ph, pw) = self.num_actions, self.geometry.positions_shape
            raise ValueError(
                f"action must be an integer in [0, {A - 1}] ({ph}x{pw} glimpse positions), got {brief(actions)}"
            )
        a = np.where(skip, 0, a)
        self.geometry.action_to_patch(a)  # raises ValueError for an action off the grid (before a cast wraps it)
        a = a.astype(np.int64)
        if self.config.strict and not self.config.allow_repeats:
            repeats = np.flatnonzero(self.used[np.arange(B), a] & ~skip)
            if repeats.size:
                b = int(repeats[0])
                raise ValueError(
                    f"action {int(a[b])} repeats a glimpse position already taken this episode"
                    f"{self._rows_text(repeats)}, and strict=True refuses it: choose where action_masks() is True "
                    f"(info['action_mask'] == 1), or pass strict=False (repeats taken, flagged in info['repeated'])"
                )
        return a

    def _rows_text(self, rows: np.ndarray) -> str:
        if self.batch_size == 1:
            return ""
        more = f" and {rows.size - 10} more" if rows.size > 10 else ""
        return f" (env {', '.join(map(str, rows[:10].tolist()))}{more})"

    @torch.inference_mode()
    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray]:
        """One glimpse in every row: cut, TORE step, reveal, reward.

        Args:
            actions: see :meth:`parse_actions`. A rejected batch leaves every row unchanged.

        Returns:
            rewards float32 [B] and terminated bool [B] (budget spent).
        """
        a = self.parse_actions(actions)
        cfg, geo, m = self.config, self.geometry, self.model
        B, dev = self.batch_size, self.device
        t = self.steps.copy()  # glimpses before this one
        if cfg.action_mode == "discrete":
            rows_np, cols_np = geo.action_to_patch(a)
            boxes_np = geo.boxes(rows_np, cols_np)
            rows_t = torch.from_numpy(rows_np).to(dev)
            cols_t = torch.from_numpy(cols_np).to(dev)
            pixels = geo.cut(self.hidden, rows_t, cols_t)
            coords = geo.glimpse_coords(rows_t, cols_t)
            boxes = torch.from_numpy(boxes_np).to(dev)
        else:
            boxes = geo.continuous_boxes(torch.from_numpy(a).to(dev))
            pixels = geo.cut_continuous(self.hidden, boxes) / 255.0  # the model reads floats as [0, 1]
            coords = geo.continuous_coords(boxes)
            boxes_np = boxes.cpu().numpy()
        out = m.step(self.cache, pixels, coords)
        self.seen |= _visited(self._pixels, boxes)
        self.visited |= _visited(geo, boxes)
        logits = out.logits.float()
        self.probs = logits.softmax(-1)
        self.cls = out.features.float()
        if cfg.entropy:
            self.entropy = self._entropy_map(out)
        pred = logits.argmax(-1)
        terminated = self.steps >= cfg.budget
        final = torch.from_numpy(terminated).to(dev)
        before = Belief(self.logits, self.labels, torch.zeros_like(final))
        rewards = self.reward_fn(before, Belief(logits, self.labels, final))
        self.logits = logits
        # One host transfer for what the infos need.
        host = torch.cat([rewards.float()[:, None], pred.float()[:, None]], dim=1).cpu().numpy()
        self.pred_np = host[:, 1].astype(np.int64)
        if cfg.action_mode == "discrete":
            self.repeated = self.used[np.arange(B), a]  # a fresh array: infos hold no view of it
            self.used[np.arange(B), a] = True
        self.boxes[np.arange(B), t] = boxes_np
        return host[:, 0].astype(np.float32), terminated

    # --------------------------------------------------------------- outputs
    def action_masks(self) -> np.ndarray:
        """bool [B, A]: False at positions taken this episode (advice, or a refusal with ``strict``); all True in
        continuous mode or with ``allow_repeats``."""
        if self.config.action_mode == "continuous" or self.config.allow_repeats:
            return np.ones((self.batch_size, self.num_actions), dtype=bool)
        return ~self.used

    @torch.inference_mode()
    def observe(self, rows: np.ndarray | None = None, as_torch: bool = False) -> dict[str, Any]:
        """Observations of some rows (None: all), fresh copies.

        Returns:
            {"canvas": uint8 [R, H, W, C] revealed pixels (unseen = 0), "visited": uint8 [R, gh, gw],
            "step": int64 [R, 1], "probs": float32 [R, classes], "cls": float32 [R, D],
            "entropy": float32 [R, gh, gw]}; numpy arrays, or tensors on the model's device if ``as_torch``.
        """
        idx = slice(None) if rows is None else torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        steps = self.steps if rows is None else self.steps[np.asarray(rows, dtype=np.int64)]
        obs = {
            "canvas": self.hidden[idx] * self.seen[idx].unsqueeze(-1),
            "visited": self.visited[idx].to(torch.uint8),
            "step": torch.from_numpy(steps.astype(np.int64)[:, None]).to(self.device),
            "probs": self.probs[idx].clone(),
            "cls": self.cls[idx].clone(),
            "entropy": self.entropy[idx].float().clone(),
        }
        if as_torch:
            return obs
        return {k: v.cpu().numpy() for k, v in obs.items()}

    def infos(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Batched info of some rows (None: all); see the environment's docstring for the keys."""
        idx = np.arange(self.batch_size) if rows is None else np.asarray(rows, dtype=np.int64)
        t = self.steps[idx]
        box = self.boxes[idx, np.maximum(t - 1, 0)]
        box[t == 0] = np.nan  # no glimpse yet
        pred = self.pred_np[idx]
        label = self.labels_np[idx]
        return {
            "prediction": pred.copy(),
            "correct": pred == label,
            "label": label.copy(),
            "index": self.index_np[idx].copy(),
            "step_flops": self.flops_per_step[t],
            "cumulative_flops": self.flops_cumulative[t],
            "glimpse_box": box,
            "action_mask": self.action_masks()[idx].astype(np.int8),
            "skipped_images": self.skipped_np[idx].copy(),
            "repeated": self.repeated[idx],
        }

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
            label=int(self.labels_np[row]) if self.started[row] else None,
        )


_REBUILT = frozenset(
    {
        "source",
        "model",
        "device",
        "K",
        "reward_fn",
        "geometry",
        "_pixels",
        "num_actions",
        "class_names",
        "flops_per_step",
        "flops_cumulative",
        "observation_space",
        "action_space",
        "_empty_logits",
        "_empty_probs",
        "_empty_cls",
        "_empty_entropy",
        "_empty_pred",
    }
)
