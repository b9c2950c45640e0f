"""What the single and the vector environment read off their :class:`envs.engine.AVEEngine`: one row of a
batched info dict, and read-only views of the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from avex.geometry import GlimpseGeometry
from avex.model import TOREViT

if TYPE_CHECKING:
    from envs.engine import AVEEngine

__all__ = ["EngineViews", "row_info"]


def row_info(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row ``i`` of a batched info dict, with Python scalars (int, bool, float) and per-row arrays."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        v = value[i]
        out[key] = v.item() if np.ndim(v) == 0 else v.copy()
    return out


class EngineViews:
    """Read-only views of an env's :class:`AVEEngine` (``self.engine``), shared by the single and vector env."""

    engine: AVEEngine

    @property
    def model(self) -> TOREViT:
        """The shared :class:`avex.model.TOREViT`."""
        return self.engine.model

    @property
    def class_names(self) -> list[str]:
        return self.engine.class_names

    @property
    def geometry(self) -> GlimpseGeometry:
        """Glimpse geometry (grid, glimpse size, position stride)."""
        return self.engine.geometry

    @property
    def budget(self) -> int:
        """Glimpses per episode."""
        return self.engine.config.budget

    @property
    def K(self) -> int:
        """The TORE split point the env runs at."""
        return self.engine.K
