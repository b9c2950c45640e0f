"""TORE's training policy: which split point K, how many glimpses T and which glimpses each batch trains on.

One set of weights has to serve every split point K and every number of glimpses, so each batch
follows TORE's policy (Token Recycling, arXiv 2311.15335):

1. one K drawn uniformly from 0..depth for the whole batch;
2. one glimpse count T for the whole batch: with probability 1/2 uniform in 1..budget, otherwise
   uniform in budget..n_tiles (n_tiles: the non-overlapping tiles that cover the grid, so T=n_tiles
   with shift 0 reveals every patch); ``--train-k`` and ``--train-t`` restrict K and T to given sets;
3. per image, T random NON-overlapping g x g glimpses: a random shift (dy, dx) in {0..g-1}^2, then T
   distinct positions of the shifted stride-g lattice that fit in the grid;
4. with ``--continuous-glimpses P`` (:func:`draw_continuous`), a fraction P of the batches instead takes T
   random continuous (y, x, z) glimpses per image (AdaGlimpse's boxes, :func:`sample_continuous`), cut as the
   env's continuous mode cuts them (:func:`cut_continuous_glimpses`), so one set of weights serves both
   action modes.

Every draw of a step comes from generators seeded by (seed, step) (:func:`step_rngs`) and is made for
the GLOBAL batch on every rank, so each rank can keep its slice and all ranks agree.

Shapes: B batch, T glimpses, g glimpse side in patches, G = g*g tokens per glimpse, s = g*patch pixels,
N grid patches, C channels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple, cast

import numpy as np
import torch

from avex.geometry import GlimpseGeometry

__all__ = [
    "cut_continuous_glimpses",
    "cut_glimpses",
    "draw_continuous",
    "draw_k_and_t",
    "n_tiles",
    "sample_continuous",
    "sample_glimpses",
    "step_rngs",
]


def step_rngs(seed: int, step: int, device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
    """Host and device generators of one step, seeded by (seed, step): identical on every rank."""
    host_seq, device_seq = np.random.SeedSequence([seed, step]).spawn(2)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(device_seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
    return np.random.default_rng(host_seq), gen


def draw_k_and_t(
    rng: np.random.Generator,
    depth: int,
    budget: int,
    n_tiles: int,
    ks: Sequence[int] | None = None,
    ts: Sequence[int] | None = None,
) -> tuple[int, int]:
    """One split point K ~ U{0..depth} (TORE's policy; or uniform over ``ks``); T ~ U{1..budget} or
    U{budget..n_tiles} with probability 1/2 each (TORE's policy; or uniform over ``ts``)."""
    K = int(rng.integers(0, depth + 1)) if ks is None else int(ks[int(rng.integers(0, len(ks)))])
    if ts is not None:
        return K, int(ts[int(rng.integers(0, len(ts)))])
    T = int(rng.integers(1, budget + 1)) if rng.random() < 0.5 else int(rng.integers(budget, n_tiles + 1))
    return K, T


def draw_continuous(rng: np.random.Generator, fraction: float) -> bool:
    """Whether this batch's glimpses are continuous, with probability ``fraction``; drawn after K and T.

    ``fraction`` 0 draws nothing, so every later draw of the step stays what it was without the option.
    """
    return fraction > 0 and bool(rng.random() < fraction)


def n_tiles(geo: GlimpseGeometry) -> int:
    """Non-overlapping g x g tiles of the unshifted lattice (all patches when g divides the grid)."""
    return (geo.grid[0] // geo.glimpse) * (geo.grid[1] // geo.glimpse)


class _Lattices(NamedTuple):
    """A geometry's shifted lattices as tables on one device (:func:`_lattices`), so that a draw indexes them."""

    holds: torch.Tensor  # int64 [g*g]: glimpses the lattice of each shift (dy * g + dx) holds
    unfit: torch.Tensor  # bool [g*g, ph*pw]: where a position of the unshifted lattice does not fit at that shift
    rows: torch.Tensor  # int64 [g*g * ph*pw]: top-left patch row of (shift, position), flattened
    cols: torch.Tensor  # int64 [g*g * ph*pw]: and column


@functools.lru_cache(maxsize=32)
def _lattices(g: int, gh: int, gw: int, device: torch.device) -> _Lattices:
    ph, pw = gh // g, gw // g  # the largest lattice (shift 0)
    shift = torch.arange(g)
    holds = (((gh - shift) // g)[:, None] * ((gw - shift) // g)[None, :]).flatten()
    dy, dx = shift.repeat_interleave(g)[:, None], shift.repeat(g)[:, None]  # [g*g, 1] each shift's (dy, dx)
    pos = torch.arange(ph * pw)[None]
    rows, cols = dy + (pos // pw) * g, dx + (pos % pw) * g  # [g*g, ph*pw]
    unfit = (rows + g > gh) | (cols + g > gw)
    return _Lattices(*(t.to(device) for t in (holds, unfit, rows.flatten(), cols.flatten())))


def sample_glimpses(
    geo: GlimpseGeometry, batch: int, T: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """T random non-overlapping glimpses per image, with a random lattice shift per image.

    Image i draws a shift (dy, dx) in {0..g-1}^2 among the shifts whose lattice holds at least T
    glimpses, then T distinct positions of the lattice {(dy + a*g, dx + b*g)} that fit in the grid
    (random scores over the unshifted lattice, -inf where a position does not fit, top-T). Everything
    that depends on the geometry alone is a table made once per device (:func:`_lattices`): a draw is two
    uniform draws, their choices, and lookups, a dozen kernels on a GPU.

    Returns:
        rows, cols: int64 [batch, T] top-left patches, on the generator's device.
    """
    g, (gh, gw), dev = geo.glimpse, geo.grid, generator.device
    ph, pw = gh // g, gw // g
    if not 1 <= T <= ph * pw:
        raise ValueError(f"T={T} non-overlapping {g}x{g} glimpses do not fit the {gh}x{gw} grid (at most {ph * pw})")
    lat = _lattices(g, gh, gw, dev)
    score = torch.rand(batch, g * g, generator=generator, device=dev).masked_fill(lat.holds < T, -1.0)
    s = score.argmax(dim=1)  # [B] the shift
    score = torch.rand(batch, ph * pw, generator=generator, device=dev).masked_fill(lat.unfit[s], float("-inf"))
    at = s[:, None] * (ph * pw) + score.topk(T, dim=1).indices  # [B, T] (shift, position) in the tables
    return lat.rows[at], lat.cols[at]


def cut_glimpses(
    geo: GlimpseGeometry, canvases: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels, token coordinates and revealed patches of T glimpses per image.

    Args:
        canvases: [B, H, W, C] (uint8).
        rows, cols: int64 [B, T] top-left patches.

    Returns:
        pixels [B, T, C, s, s], coords int64 [B, T, G, 2], seen bool [B, N] (patches some glimpse revealed).
    """
    b, t = rows.shape
    r, c = rows.reshape(-1), cols.reshape(-1)
    rep = canvases[:, None].expand(b, t, *canvases.shape[1:]).reshape(b * t, *canvases.shape[1:])
    s, p = geo.sensor_pixels, geo.patch
    pixels = geo.cut(rep, r, c).reshape(b, t, canvases.shape[-1], s, s)
    coords = geo.glimpse_coords(r, c).reshape(b, t, geo.tokens_per_glimpse, 2)
    boxes = torch.stack([r * p, c * p, r * p + s, c * p + s], dim=-1).float()
    visited = cast(torch.Tensor, geo.visited_patches(boxes))  # a tensor for tensor boxes
    return pixels, coords, visited.reshape(b, t, geo.num_patches).any(dim=1)


def sample_continuous(batch: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """T random continuous glimpses per image: (y, x, z) uniform in [0, 1)^3, the env's continuous actions.

    Returns:
        float32 [batch, T, 3] on the generator's device.
    """
    return torch.rand(batch, T, 3, generator=generator, device=generator.device)


def cut_continuous_glimpses(
    geo: GlimpseGeometry, canvases: torch.Tensor, yxz: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels, token coordinates and revealed patches of T continuous glimpses per image, as the env makes them.

    The env's continuous step (``envs/engine.py``) turns (y, x, z) into a box
    (:meth:`~GlimpseGeometry.continuous_boxes`), resamples it onto the ``s x s`` sensor
    (:meth:`~GlimpseGeometry.cut_continuous`) and hands the model those pixels divided by 255 (floats, which the
    model reads as [0, 1]) with float token coordinates (:meth:`~GlimpseGeometry.continuous_coords`); this does
    the same for every glimpse at once. A patch counts as revealed when its centre lies inside a box (the env's
    ``visited``): a zoomed-out glimpse reveals every patch it spans, at the sensor's lower resolution, and the
    reconstruction loss then reads only the patches no box reached.

    Args:
        canvases: [B, H, W, C] uint8.
        yxz: float [B, T, 3] in [0, 1].

    Returns:
        pixels float32 [B, T, C, s, s] in [0, 1], coords float32 [B, T, G, 2], seen bool [B, N].
    """
    b, t = yxz.shape[:2]
    boxes = geo.continuous_boxes(yxz.reshape(b * t, 3))  # [B*T, 4]
    rep = canvases[:, None].expand(b, t, *canvases.shape[1:]).reshape(b * t, *canvases.shape[1:])
    s = geo.sensor_pixels
    pixels = (geo.cut_continuous(rep, boxes) / 255.0).reshape(b, t, canvases.shape[-1], s, s)
    coords = geo.continuous_coords(boxes).reshape(b, t, geo.tokens_per_glimpse, 2)
    visited = cast(torch.Tensor, geo.visited_patches(boxes))  # a tensor for tensor boxes
    return pixels, coords, visited.reshape(b, t, geo.num_patches).any(dim=1)
