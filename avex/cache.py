"""What TORE keeps between glimpses (:class:`TokenCache`) and what its aggregator returns (:class:`AggregatorOutput`).

Shapes use: B batch, G tokens per glimpse, P prefix tokens (CLS + registers), D embedding width, L cached tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from avex.kernel_fallback import _kernel_may_run, kernel_or_fallback
from avex.layer_norm import launch_pays, norm_forward
from avex.step_writes import append_glimpse
from avex.transfer import send

__all__ = ["AggregatorOutput", "TokenCache"]


@dataclass
class AggregatorOutput:
    """What the aggregator returns after a glimpse.

    Attributes:
        logits: [B, num_classes].
        features: [B, D] pooled pre-logits embedding (the CLS token after the final norm).
        hidden: [B, P + L, D] every token before the final norm.
        valid: [B, P + L] bool, False at cache slots a row has not filled yet; None when all rows are full.
        coords: [B, L, 2] patch coordinates of the cached tokens.
        tokens: [B, P + L, D] every token after the final norm (the decoder's input): computed on first
            access, since the logits need only the CLS token's norm and most callers (a benchmark, an env
            without the entropy map) never read the rest.
    """

    logits: torch.Tensor
    features: torch.Tensor
    hidden: torch.Tensor
    valid: torch.Tensor | None
    coords: torch.Tensor
    norm: nn.Module = field(repr=False)  # the ViT's final norm, for ``tokens``
    _tokens: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens(self) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = norm_forward(self.norm, self.hidden)  # the Triton kernel on CUDA
        return self._tokens


@dataclass
class TokenCache:
    """Per-row episode state, preallocated for the glimpse budget.

    Attributes:
        buf: [B, P + capacity * G, D]. ``buf[:, :P]`` holds the running mean of the glimpses' prefix
            outputs (the empty pass's prefix while a row has no glimpse); then each glimpse's G midway
            tokens in order. The aggregator reads a view of it: no per-step concatenation.
        coords: float32 [B, capacity * G, 2] patch coordinates of the cached tokens (for the decoder).
        counts: int64 [B] glimpses cached per row, kept on the host so that slicing needs no sync.
        K: the split this cache was filled with (cached tokens are only valid for that K).
        tokens_per_glimpse: G.
    """

    buf: torch.Tensor
    coords: torch.Tensor
    counts: np.ndarray
    K: int
    tokens_per_glimpse: int
    num_prefix: int = field(default=1)

    @property
    def capacity(self) -> int:
        """Glimpses each row can hold."""
        return (self.buf.shape[1] - self.num_prefix) // self.tokens_per_glimpse

    @property
    def batch_size(self) -> int:
        """B: the rows of the cache."""
        return self.buf.shape[0]

    def row_indices(self, rows: np.ndarray | None) -> np.ndarray:
        """Row indices of a bool mask or an index array [B] (None: every row)."""
        return (
            np.arange(self.batch_size)
            if rows is None
            else np.flatnonzero(np.asarray(rows))
            if np.asarray(rows).dtype == bool
            else np.asarray(rows)
        )

    def write_prefix(self, idx: np.ndarray, prefix: torch.Tensor) -> None:
        """Set the prefix mean of the rows ``idx`` to ``prefix`` [1, P, D] (the empty pass's, when they are reset)."""
        prefix = prefix.to(self.buf.dtype)
        if (
            idx.size == self.batch_size and (idx == np.arange(idx.size)).all()
        ):  # all rows: a slice, no index copy (no sync; capturable)
            self.buf[:, : self.num_prefix] = prefix
        else:
            self.buf[send(idx, self.buf.device), : self.num_prefix] = prefix

    def take(self, rows: np.ndarray, capacity: int | None = None) -> TokenCache:
        """A new cache holding copies of some rows (a row may be taken several times); ``self`` is not changed.

        Args:
            rows: int [R] row indices.
            capacity: glimpses each new row can hold (default: this cache's); at least the most a taken row holds.

        Returns:
            A :class:`TokenCache` with ``buf`` [R, P + capacity * G, D], ``coords`` [R, capacity * G, 2] and
            ``counts`` [R]: row i is row ``rows[i]`` (its prefix mean and cached glimpses), the rest zeros.
        """
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        counts = self.counts[idx].copy()
        cap = self.capacity if capacity is None else capacity
        held = int(counts.max()) if counts.size else 0
        if held > cap:
            raise ValueError(f"capacity={cap} glimpses cannot hold rows that already cache {held}")
        g2, p = self.tokens_per_glimpse, self.num_prefix
        t = send(idx, self.buf.device)
        # Only the filled slots are copied: a copy made to try one more glimpse needs little more room.
        buf = self.buf.new_zeros(idx.size, p + cap * g2, self.buf.shape[2])
        buf[:, : p + held * g2] = self.buf[t, : p + held * g2]
        coords = self.coords.new_zeros(idx.size, cap * g2, 2)
        coords[:, : held * g2] = self.coords[t, : held * g2]
        return TokenCache(buf, coords, counts, self.K, g2, p)

    def append(self, x: torch.Tensor, coords: torch.Tensor) -> None:
        """Cache one glimpse per row: its G midway tokens in the row's next slots, its prefix into the running mean.

        Args:
            x: [B, P + G, D] the iterator's output, in ``buf``'s dtype.
            coords: [B, G, 2] the glimpse's token coordinates.
        """
        g2, p = self.tokens_per_glimpse, self.num_prefix
        n = self.counts
        if (n == n[0]).all():  # rows in step: one pass (avex.step_writes) where it pays, else static slices
            n0 = int(n[0])
            if _kernel_may_run(self.buf) and launch_pays(x):
                kernel_or_fallback(
                    "cache append",
                    lambda: append_glimpse(self.buf, self.coords, x, coords, p, n0 * g2),
                    lambda: self._append_in_step(x, coords, n0),
                    "glimpses are now cached by PyTorch's ops, with the same results but slower.",
                )
            else:
                self._append_in_step(x, coords, n0)
        else:  # rows reset at different times: scatter at per-row offsets (sent without waiting for the device)
            dev = self.buf.device
            b = torch.arange(self.batch_size, device=dev)[:, None]
            slots = send(n[:, None] * g2 + np.arange(g2)[None], dev)
            self.buf[b, p + slots] = x[:, p:]
            self.coords[b, slots] = coords.float()
            weight = send(1.0 / (n + 1), dev).to(self.buf.dtype)[:, None, None]
            self.buf[:, :p].lerp_(x[:, :p], weight)
        self.counts += 1

    def _append_in_step(self, x: torch.Tensor, coords: torch.Tensor, n0: int) -> None:
        """:meth:`append` by PyTorch's ops for rows that each hold ``n0`` glimpses: static slices (CUDA-graph
        friendly)."""
        g2, p = self.tokens_per_glimpse, self.num_prefix
        self.buf[:, p + n0 * g2 : p + (n0 + 1) * g2] = x[:, p:]
        self.coords[:, n0 * g2 : (n0 + 1) * g2] = coords  # copy_ casts to float
        self.buf[:, :p].lerp_(x[:, :p], 1.0 / (n0 + 1))  # running mean: one kernel, one rounding

    def filled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The aggregator's view of every row's cached tokens (no copy).

        Returns:
            ``buf`` [B, P + L, D] and ``coords`` [B, L, 2], L = G times the most glimpses any row holds, and
            ``valid`` [B, P + L] bool, False at the slots of rows with fewer (None when every row holds as many).
        """
        g2, p = self.tokens_per_glimpse, self.num_prefix
        n = self.counts
        length = int(n.max()) * g2
        valid = None
        if not (n == n[0]).all():
            lengths = send(p + n * g2, self.buf.device)
            valid = torch.arange(p + length, device=self.buf.device)[None] < lengths[:, None]
        return self.buf[:, : p + length], self.coords[:, :length], valid
