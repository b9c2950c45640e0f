"""The fixed part of an :class:`envs.engine.AVEEngine`: what its config builds, the same for every row.

The canvas source, the shared model, the glimpse geometry, the spaces, the FLOP tables and the
image-independent empty pass; all of it is rebuilt from the config on unpickling (see the engine's
``_REBUILT``).
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import torch
from gymnasium import spaces

from avex.cache import AggregatorOutput
from avex.flops import ViTDims, step_flops
from avex.geometry import GlimpseGeometry
from envs.config import EnvConfig, check_grid
from envs.models import check_model, env_model
from envs.rewards import REWARDS

__all__ = ["EngineSetup", "covered"]


class EngineSetup:
    """The set-up of :class:`envs.engine.AVEEngine` (its base class): :meth:`_build` makes every attribute
    that does not depend on the rows, from ``config``."""

    config: EnvConfig

    def _build(self) -> None:
        """Source, model, geometry, spaces and the image-independent empty pass (rebuilt on unpickling)."""
        cfg = self.config
        check_model(cfg)  # a timm model TORE cannot wrap is refused before the data are read
        self.source = cfg.make_source()
        self.model = env_model(cfg, self.source)
        m = self.model
        check_grid(m.grid)
        self.device = m.pixel_mean.device
        self.K = m.depth // 2 if cfg.K is None else m.check_k(cfg.K)
        if cfg.entropy and m.decoder is None:
            raise ValueError("entropy=True needs a model with a glimpse decoder; this one has none: pass entropy=False")
        h, w, c = self.source.canvas_shape
        g = cfg.glimpse
        if not 1 <= g <= min(m.grid):
            raise ValueError(
                f"glimpse must be in 1..{min(m.grid)} patches for the {m.grid[0]}x{m.grid[1]} patch grid, got {g}"
            )
        stride = g if cfg.positions == "grid" else 1
        self.geometry = GlimpseGeometry((h, w), m.patch, g, stride, float(cfg.max_ratio))
        # The same centre-inside rule at pixel level: which canvas pixels a glimpse box reveals.
        self._pixels = GlimpseGeometry((h, w), 1, 1)
        self.num_actions = self.geometry.num_actions
        self._check_budget()
        self.class_names = list(self.source.class_names)
        self.reward_fn = REWARDS.get(cfg.reward)
        G = self.geometry.tokens_per_glimpse
        flops = [
            step_flops(ViTDims.of(m), t, G, self.K, decoder=cfg.observes_entropy, recon=False)
            for t in range(cfg.budget + 1)
        ]  # what a step and its observation run
        self.flops_per_step = np.asarray(flops, dtype=np.int64)  # [budget + 1], index t = glimpses after the step
        self.flops_cumulative = np.cumsum(self.flops_per_step)
        self.observation_space = self._observation_space()
        self.action_space: spaces.Space = (
            spaces.Discrete(self.num_actions)
            if cfg.action_mode == "discrete"
            else spaces.Box(0.0, 1.0, (3,), np.float32)
        )
        with torch.inference_mode():
            # The empty pass sees no pixel, so it is the same for every image: computed once.
            empty = m.init_cache(1, 1, self.K, G, device=self.device)
            out = m.aggregate_cache(empty)
            self._empty_logits = out.logits.float()
            self._empty_probs = self._empty_logits.softmax(-1)
            self._empty_cls = out.features.float()
            self._empty_entropy = self._entropy_map(out) if cfg.entropy else torch.zeros(1, *m.grid, device=self.device)
            self._empty_pred = int(self._empty_logits.argmax(-1).item())
            # What a reset writes into a cache row, computed once (TOREViT.reset_cache recomputes it per call).
            self._empty_prefix = m.empty_prefix(self.K)  # [1, P, D]
        # Patch and pixel centres (GlimpseGeometry.visited_patches' rule) on the device once: a step reads them
        # without a host-to-device copy.
        self._patch_centres = _centres(self.geometry, self.device)
        self._pixel_centres = _centres(self._pixels, self.device)
        self._sensor_offsets = torch.arange(self.geometry.sensor_pixels, device=self.device)  # pixels along a glimpse

    def _check_budget(self) -> None:
        """Bound the budget by the geometry before anything sized by it (token cache, FLOP tables) exists."""
        cfg, A, N = self.config, self.num_actions, self.geometry.num_patches
        if cfg.action_mode == "discrete" and not cfg.allow_repeats:
            # Repeats are taken by default but masked: past A glimpses a masked agent (MaskablePPO) would
            # face a mask with no position left.
            if cfg.budget > A:
                raise ValueError(
                    f"budget={cfg.budget} exceeds the {A} distinct glimpse positions "
                    f"(positions={cfg.positions!r}), after which the action masks allow nothing: lower budget, "
                    "or pass allow_repeats=True (masks allow repeats)"
                )
        elif cfg.budget > N:
            # Each glimpse adds its tokens to the cache every later step attends over; past one glimpse per
            # patch, glimpses only look again at what was seen.
            raise ValueError(
                f"budget={cfg.budget} exceeds the {N} patches of the {self.geometry.grid[0]}x{self.geometry.grid[1]} "
                f"grid, the most glimpses an episode may take with allow_repeats=True or continuous actions "
                f"(each adds {self.geometry.tokens_per_glimpse} tokens to every later step): lower budget"
            )

    def _observation_space(self) -> spaces.Dict:
        """The Dict space of one row's observation: the keys of ``config.obs_keys``."""
        h, w, c = self.source.canvas_shape
        gh, gw = self.geometry.grid
        every: dict[str, spaces.Space[Any]] = {
            "canvas": spaces.Box(0, 255, (h, w, c), np.uint8),
            "visited": spaces.Box(0, 1, (gh, gw), np.uint8),
            "step": spaces.Box(0, self.config.budget, (1,), np.int64),
            "probs": spaces.Box(0.0, 1.0, (self.model.num_classes,), np.float32),
            "cls": spaces.Box(-np.inf, np.inf, (self.model.embed_dim,), np.float32),
            "entropy": spaces.Box(0.0, self._entropy_bound(), (gh, gw), np.float32),
        }
        return spaces.Dict({k: every[k] for k in self.config.observed})

    def _entropy_bound(self) -> float:
        """Largest possible entropy value: per head at most log2 of the number of keys (bits)."""
        dec = self.model.decoder
        if dec is None:
            return 0.0
        keys = 1 + self.config.budget * self.geometry.tokens_per_glimpse + self.geometry.num_patches
        heads = cast(int, dec.blocks[-1].heads)  # a plain int attribute; nn.Module types it Tensor | Module
        return float(heads * math.log2(keys))

    def _entropy_map(self, out: AggregatorOutput) -> torch.Tensor:  # tests count its calls
        """The decoder's AME entropy map, float [B, gh, gw] (the env never reads the reconstruction)."""
        _, entropy = self.model.decode(out, recon=False)
        assert entropy is not None, "decode(entropy=True) returns the entropy map"
        return entropy


def _centres(geometry: GlimpseGeometry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [gh] and [gw]: the pixel centres of a geometry's patch rows and columns, on ``device`` (the values
    :meth:`GlimpseGeometry.visited_patches` compares a box with)."""
    gh, gw = geometry.grid
    return (
        ((torch.arange(gh) + 0.5) * geometry.patch).to(device),
        ((torch.arange(gw) + 0.5) * geometry.patch).to(device),
    )


def covered(centres: tuple[torch.Tensor, torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """bool [B, gh, gw]: the cells whose centre lies inside each box (``GlimpseGeometry.visited_patches``' rule,
    with the centres already on the device).

    Args:
        centres: float32 [gh] and [gw], the cells' centres in pixels (:func:`_centres`).
        boxes: float32 [B, 4] pixel boxes (y0, x0, y1, x1).
    """
    cy, cx = centres
    inside_y = (cy[None, :] >= boxes[:, 0:1]) & (cy[None, :] < boxes[:, 2:3])  # [B, gh]
    inside_x = (cx[None, :] >= boxes[:, 1:2]) & (cx[None, :] < boxes[:, 3:4])  # [B, gw]
    return inside_y[:, :, None] & inside_x[:, None, :]
