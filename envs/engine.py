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

from avex.cache import AggregatorOutput
from avex.checkpoint import built_digest, weights_digest
from avex.checks import brief
from avex.transfer import fill_rows, send, to_device
from envs.config import EnvConfig, check_int
from envs.engine_outputs import EngineOutputs
from envs.engine_setup import covered
from envs.rewards import Belief

__all__ = ["AVEEngine"]


class AVEEngine(EngineOutputs):
    """B independent AVE episodes over one shared model, stepped together.

    A step moves nothing to the host: rewards, predictions and the model's belief stay on the device, and
    what the device needs of the host (the glimpse positions) goes in one non-blocking copy
    (:mod:`envs.transfer`). The entropy map is computed lazily (:attr:`entropy`). What the environments
    read off the engine, and the one transfer of it, is in :class:`envs.engine_outputs.EngineOutputs`.

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
        try:
            self._alloc()
        except (RuntimeError, MemoryError) as err:  # torch's CPU allocator raises a bare RuntimeError
            if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(err):
                raise
            raise ValueError(  # a batch too large for the device: say which number
                f"num_envs={batch_size}: the envs' state (token cache, canvases, maps) does not fit in {self.device}'s "
                "memory: lower num_envs"
            ) from None

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
            self.pred = torch.full((B,), self._empty_pred, dtype=torch.int64, device=dev)
            self._entropy = self._empty_entropy.expand(B, -1, -1).clone()
            self._arange = torch.arange(B, device=dev)
            # True on the device: marking cells at tensor indices with a Python True would copy it there first,
            # and CUDA's index_put_ waits for that copy.
            self._true = torch.ones((), dtype=torch.bool, device=dev)
        self._no_pending()
        self._used_t = None  # a device copy of ``used``, made when device infos ask for it
        self._rows_memo: tuple[np.ndarray, torch.Tensor] | None = None
        self.used = np.zeros((B, self.num_actions), dtype=bool)
        self.repeated = np.zeros(B, dtype=bool)  # the last glimpse took a position already taken this episode
        self.boxes = np.full((B, cfg.budget, 4), np.nan, dtype=np.float32)
        self.index_np = np.zeros(B, dtype=np.int64)
        self.skipped_np = np.zeros(B, dtype=np.int64)  # unreadable files passed over drawing this episode's image
        self.started = np.zeros(B, dtype=bool)

    def _no_pending(self) -> None:
        """No entropy map waits to be computed (see :attr:`entropy`)."""
        self._pending: AggregatorOutput | None = None  # the step output the next map is computed from
        self._cleared: list[slice | torch.Tensor] = []  # rows put back to their start since that step

    @property
    def steps(self) -> np.ndarray:
        """int64 [B] glimpses taken in each row's episode (the token cache's count)."""
        return self.cache.counts

    @property
    def entropy(self) -> torch.Tensor:
        """float32 [B, gh, gw]: every row's AME entropy map (zeros with ``entropy=False``), on the device.

        Computed on first read after a step, from that step's aggregator output (the decoder reads its
        tokens and their coordinates, which stay as they are until the next step), and kept until the next
        step; a step that nobody reads the map of never runs the decoder.
        """
        if self._pending is not None:
            with torch.inference_mode():
                entropy = self._entropy_map(self._pending)
                for rows in self._cleared:  # reset since the step: the empty pass's map
                    entropy[rows] = self._empty_entropy
            self._entropy = entropy
            self._no_pending()
        return self._entropy

    def device_rows(self, rows: np.ndarray) -> slice | torch.Tensor:
        """Row indices as the device indexes with them: a slice for every row in order, else an int64 tensor
        sent without blocking (the last one is kept: a step indexes the same rows several times)."""
        if rows.size == self.batch_size and (rows == np.arange(rows.size)).all():
            return slice(None)
        memo = self._rows_memo
        if memo is not None and np.array_equal(memo[0], rows):
            return memo[1]
        index = send(rows.astype(np.int64), self.device)
        self._rows_memo = (rows.copy(), index)
        return index

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
        _ = self.entropy  # computes a pending map: the step output it comes from is not pickled
        state = {k: v for k, v in self.__dict__.items() if k not in _REBUILT and k not in _TRANSIENT}
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
        self._no_pending()
        self._used_t, self._rows_memo = None, None
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
        r = self.device_rows(rows)
        self.hidden[r] = canvases.to(self.device)
        self.labels[r] = labels.to(self.device)
        self.index_np[rows] = used_idx
        self.skipped_np[rows] = skipped
        self.started[rows] = True
        self._clear(rows, r)

    @torch.inference_mode()
    def clear_rows(self, rows: np.ndarray) -> None:
        """Put some rows back to the start of their episode on the same image: nothing revealed, empty pass.

        Args:
            rows: int [R] rows (their canvas, label and image index stay).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size:
            self._clear(rows, self.device_rows(rows))

    def _clear(self, rows: np.ndarray, r: slice | torch.Tensor) -> None:
        """:meth:`clear_rows` with the rows' device index ``r`` (nothing waits for the device)."""
        fill_rows(self.seen, r, False)
        fill_rows(self.visited, r, False)
        cache = self.cache
        cache.counts[rows] = 0  # TOREViT.reset_cache, with the empty prefix computed once
        cache.buf[r, : cache.num_prefix] = self._empty_prefix.to(cache.buf.dtype)
        self.probs[r] = self._empty_probs
        self.cls[r] = self._empty_cls
        self.logits[r] = self._empty_logits
        fill_rows(self.pred, r, self._empty_pred)
        if self._pending is not None:
            self._cleared.append(r)  # the map is not computed yet: these rows get the empty pass's when it is
        else:
            self._entropy[r] = self._empty_entropy
        if self._used_t is not None:
            fill_rows(self._used_t, r, False)
        self.used[rows] = False
        self.repeated[rows] = False
        self.boxes[rows] = np.nan

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
        # The common case, every row started and within budget, costs two reductions and no index arrays.
        unready = np.zeros(0, dtype=np.int64) if self.started.all() else np.flatnonzero(~self.started & ~skip)
        if unready.size:
            raise ValueError(f"call reset() before step(){self._rows_text(unready)}")
        spent = self.steps >= self.config.budget
        over = np.flatnonzero(spent & ~skip) if spent.any() else np.zeros(0, dtype=np.int64)
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
        if skip.any():
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
        if skip.any():
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
    def step(self, actions: Any) -> tuple[torch.Tensor, np.ndarray]:
        """One glimpse in every row: cut, TORE step, reveal, reward; nothing waits for the device.

        Args:
            actions: see :meth:`parse_actions`. A rejected batch leaves every row unchanged.

        Returns:
            rewards float32 [B] on the model's device, and terminated bool [B] (budget spent) on the host.
        """
        a = self.parse_actions(actions)
        cfg, geo, m, B = self.config, self.geometry, self.model, self.batch_size
        t = self.steps.copy()  # glimpses before this one
        terminated = t + 1 >= cfg.budget
        discrete = cfg.action_mode == "discrete"
        if discrete:
            rows, cols = geo.action_to_patch(a)
            boxes_np = geo.boxes(rows, cols)
            sent = to_device(dict(rows=rows, cols=cols, boxes=boxes_np, final=terminated, actions=a), self.device)
            pixels = geo.cut(self.hidden, sent["rows"], sent["cols"])
            coords = geo.glimpse_coords(sent["rows"], sent["cols"])
        else:
            # Boxes on the host (the geometry checks the actions' values there), then sent with the rest.
            boxes_np = geo.continuous_boxes(torch.from_numpy(a)).numpy()
            sent = to_device(dict(boxes=boxes_np, final=terminated), self.device)
            pixels = geo.cut_continuous(self.hidden, sent["boxes"]) / 255.0  # the model reads floats as [0, 1]
            coords = geo.continuous_coords(sent["boxes"])
        self._no_pending()  # the last step's map, if nobody read it, is never needed
        out = m.step(self.cache, pixels, coords)
        if discrete:  # the glimpse's own pixels, as the centre rule gives for an aligned box: B x s x s writes
            ys = sent["rows"][:, None] * geo.patch + self._sensor_offsets  # [B, s] pixel rows, as geo.cut reads
            xs = sent["cols"][:, None] * geo.patch + self._sensor_offsets
            self.seen.index_put_((self._arange[:, None, None], ys[:, :, None], xs[:, None, :]), self._true)
        else:  # a box anywhere: every pixel's centre tested (B x H x W)
            self.seen |= covered(self._pixel_centres, sent["boxes"])
        self.visited |= covered(self._patch_centres, sent["boxes"])
        logits = out.logits.float()
        self.probs = logits.softmax(-1)
        self.cls = out.features.float()
        if cfg.entropy:
            self._pending = out  # the entropy map, when something reads it
        self.pred = logits.argmax(-1)
        final = sent["final"]
        before = Belief(self.logits, self.labels, torch.zeros_like(final))
        rewards = self.reward_fn(before, Belief(logits, self.labels, final)).float()
        self.logits = logits
        rows_at = np.arange(B)
        if discrete:
            taken = rows_at * self.num_actions + a  # flat indices: faster than indexing two axes
            used = self.used.reshape(-1)  # a view
            self.repeated = used[taken]  # a fresh array: infos hold no view of it
            used[taken] = True
            if self._used_t is not None:
                self._used_t.index_put_((self._arange, sent["actions"]), self._true)
        if (t == t[0]).all():  # rows in step (every row started together): one slice
            self.boxes[:, t[0]] = boxes_np
        else:
            self.boxes.reshape(-1, 4)[rows_at * cfg.budget + t] = boxes_np
        return rewards, terminated


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
        "_empty_prefix",
        "_patch_centres",
        "_pixel_centres",
        "_sensor_offsets",
    }
)
# Per-step helpers, remade empty on unpickling: a pending map (computed before pickling), caches of device copies.
_TRANSIENT = frozenset({"_pending", "_cleared", "_used_t", "_rows_memo"})
