"""Look-ahead glimpse selection on TORE's token cache: imagine every allowed glimpse, keep the most telling one.

At each step, for every env and every allowed position, the agent imagines the glimpse from what it has
seen and the decoder's reconstruction of the rest, runs one cached TORE step on a copy of the env's cache
rows (every candidate of every env batched), and scores the classifier's belief after it. Token recycling
is what makes this cheap: a candidate costs one iterator pass on G tokens plus the aggregator, never a
recomputation of the glimpses already taken. The env's state (cache, canvases, generators) is only read.

Shapes: B envs, A positions, M candidates (allowed positions summed over envs), N grid patches, p patch
side, C channels, G = g * g tokens per glimpse, s = g * p glimpse side in pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from agents.base import GlimpseAgent, register_agent, require_env_keys
from avex.flops import ViTDims, step_flops, step_macs
from avex.model import TOREViT
from envs.engine import AVEEngine

__all__ = ["SCORES", "LookaheadAgent", "patch_glimpses"]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Class entropy in nats: float [M, classes] -> [M]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def _doubt(logits: torch.Tensor) -> torch.Tensor:
    """One minus the top class probability: float [M, classes] -> [M]."""
    return 1.0 - logits.float().softmax(-1).amax(-1)


# Belief after a candidate glimpse -> score, lower is better.
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"entropy": _entropy, "confidence": _doubt}


def patch_glimpses(patches: torch.Tensor, env: torch.Tensor, coords: torch.Tensor, model: TOREViT) -> torch.Tensor:
    """Assemble aligned glimpses from per-patch pixels (the decoder's layout, see :meth:`TOREViT.patchify`).

    Args:
        patches: [B, N, p * p * C] pixels of every patch of each env's canvas.
        env: int64 [M] the env each glimpse is cut from.
        coords: int64 [M, G, 2] its tokens' patch coordinates, row-major (``GlimpseGeometry.glimpse_coords``).

    Returns:
        [M, C, s, s], as ``GlimpseGeometry.cut`` gives from the unpatchified canvases.
    """
    m, g2 = coords.shape[:2]
    g, p, c = int(round(g2**0.5)), model.patch, model.in_chans
    cells = coords[..., 0] * model.grid[1] + coords[..., 1]  # [M, G]
    picked = patches[env[:, None], cells]  # [M, G, p * p * C]
    # [M, row in glimpse, col in glimpse, y, x, C] -> [M, C, row, y, col, x]
    return picked.view(m, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(m, c, g * p, g * p)


@register_agent("lookahead")
class LookaheadAgent(GlimpseAgent):
    """Look where the classifier would be surest after the glimpse, as the decoder imagines it.

    Deterministic (no randomness: a vector env's choices equal those of each env alone); ties go to the
    lowest position. Discrete actions only; the model needs its decoder.

    Args:
        engine: the env's :class:`envs.engine.AVEEngine` (only read).
        score: ``"entropy"`` (lowest class entropy after the glimpse, the default) or ``"confidence"``
            (highest top-class probability).
        chunk: most candidates per forward (bounds memory: each holds a copy of its env's cache rows); default
            512 on CPU (measured fastest there: larger chunks spill the caches) and 8192 on an accelerator.
    """

    heavy = True  # one TORE step per allowed position and env at every decision

    def __init__(self, engine: AVEEngine, score: str = "entropy", chunk: int | None = None) -> None:
        if engine.config.action_mode != "discrete":
            raise ValueError("the lookahead agent chooses discrete positions: make the env with action_mode='discrete'")
        if engine.model.decoder is None:
            raise ValueError("the lookahead agent imagines glimpses with the model's decoder; this model has none")
        if score not in SCORES:
            raise ValueError(f"score must be one of {sorted(SCORES)}, got {score!r}")
        if chunk is None:
            chunk = 512 if engine.device.type == "cpu" else 8192
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.engine = engine
        self.score = score
        self.chunk = chunk

    @classmethod
    def from_env(cls, env: Any, *, seed: int = 0, policy: str | None = None, device: str = "cpu") -> LookaheadAgent:
        """Keep a reference to an avex env's engine (single, vector or wrapped); it runs on the env's device.

        Raises:
            ValueError: a continuous env, a model without its decoder, or an observation without the canvas.
        """
        u = getattr(env, "unwrapped", env)
        agent = cls(u.engine)
        require_env_keys(u, ("canvas",), "the lookahead agent (it imagines on the canvas)")
        return agent

    def act(self, obs: dict[str, Any], action_mask: np.ndarray) -> np.ndarray:
        """obs["canvas"]: uint8 [B, H, W, C] revealed pixels, action_mask: bool [B, A] -> int64 [B] positions.

        Envs with nothing to imagine (no allowed position, or an episode already over, as in next-step
        autoreset) get their first allowed position (or 0).
        """
        eng = self.engine
        mask = np.asarray(action_mask, dtype=bool)
        if mask.shape != (eng.batch_size, eng.num_actions):
            raise ValueError(
                f"action mask of shape {mask.shape} does not fit the env's {eng.batch_size} rows of "
                f"{eng.num_actions} positions"
            )
        choice = mask.argmax(axis=1).astype(np.int64)
        live = mask & (eng.cache.counts < eng.cache.capacity)[:, None]
        env, action = np.nonzero(live)  # row-major: env by env, positions ascending
        if env.size:
            table = np.full(mask.shape, np.inf)
            table[env, action] = self.candidate_scores(obs["canvas"], env, action)
            rows = live.any(axis=1)
            choice[rows] = table[rows].argmin(axis=1)  # the first minimum: lowest position on ties
        return choice

    @torch.inference_mode()
    def candidate_scores(self, canvas: Any, env: np.ndarray, action: np.ndarray) -> np.ndarray:
        """Score candidate glimpses by the belief after each (lower is better).

        Args:
            canvas: uint8 [B, H, W, C] the revealed pixels (numpy or torch).
            env, action: int [M] each candidate's env and position.

        Returns:
            float64 [M] scores (:data:`SCORES`).
        """
        eng, m, geo = self.engine, self.engine.model, self.engine.geometry
        dev = eng.device
        imagined = self.imagine(canvas)
        rows, cols = geo.action_to_patch(np.asarray(action, dtype=np.int64))
        coords = geo.glimpse_coords(torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev))  # [M, G, 2]
        env_t = torch.from_numpy(np.asarray(env, dtype=np.int64)).to(dev)
        score = SCORES[self.score]
        out = []
        for start in range(0, len(env), self.chunk):
            sl = slice(start, start + self.chunk)
            part = env[sl]
            # A copy with room for the one imagined glimpse: the env's own cache is only read.
            cache = eng.cache.take(part, capacity=int(eng.cache.counts[part].max()) + 1)
            pixels = patch_glimpses(imagined, env_t[sl], coords[sl], m)
            out.append(score(m.step(cache, pixels, coords[sl]).logits))
        return torch.cat(out).double().cpu().numpy()

    @torch.inference_mode()
    def imagine(self, canvas: Any) -> torch.Tensor:
        """Each env's canvas as the agent believes it: seen pixels as revealed, the decoder's reconstruction elsewhere.

        Args:
            canvas: uint8 [B, H, W, C] the revealed pixels (unseen = 0).

        Returns:
            float32 [B, N, p * p * C] in [0, 1], per patch (:meth:`TOREViT.patchify`'s layout).
        """
        eng, m = self.engine, self.engine.model
        c = m.in_chans
        # The last aggregator output, recomputed: aggregate_cache only reads the cache.
        recon, _ = m.decode(m.aggregate_cache(eng.cache), recon=True, entropy=False)
        assert recon is not None, "decode(recon=True) returns the reconstruction"
        b, n = recon.shape[:2]
        # Normalised pixels back to [0, 1]; channels are the last axis of a patch's pixels.
        mean, std = m.pixel_mean.view(c), m.pixel_std.view(c)
        recon = (recon.float().view(b, n, -1, c) * std + mean).clamp(0, 1).view(b, n, -1)
        pixels = torch.as_tensor(canvas, device=eng.device).permute(0, 3, 1, 2).float() / 255.0
        seen = eng.seen[:, None].expand(-1, c, -1, -1).float()  # which pixels the agent has seen (not their values)
        return torch.where(m.patchify(seen) > 0, m.patchify(pixels), recon)

    def flops_per_decision(self, steps: int, candidates: int) -> int:
        """Analytic FLOPs (2 x MACs, :mod:`avex.flops`) of one env's choice, beyond the env's own step.

        Args:
            steps: glimpses the env has taken (0 before the first).
            candidates: allowed positions scored.

        Returns:
            The reconstruction (aggregator recomputed over the cache, head, decoder) plus ``candidates`` cached
            steps to ``steps + 1`` glimpses without the decoder.
        """
        eng = self.engine
        d, g2, K = ViTDims.of(eng.model), eng.geometry.tokens_per_glimpse, eng.K
        now = step_macs(d, steps, g2, K, decoder=True, recon=True)
        recon = 2 * (now["aggregator"] + now["head"] + now["decoder"])
        return recon + candidates * step_flops(d, steps + 1, g2, K, decoder=False)
