"""Glimpse geometry: the one place that knows where a glimpse is and which pixels and patches it covers.

Two kinds of glimpse exist:

* **Discrete** (TORE / AME): a square of ``g x g`` patches aligned to the patch grid. An action is the
  index of its top-left patch among ``(gh - g) // stride + 1`` by ``(gw - g) // stride + 1`` positions,
  row-major. ``stride=1`` lets glimpses overlap (AME); ``stride=g`` gives a non-overlapping tiling.
* **Continuous** (AdaGlimpse): ``(y, x, z)`` in ``[0, 1]^3``. The crop side is
  ``s = z * (min(H, W) * max_ratio - g * patch) + g * patch`` pixels, its top-left is
  ``(y * (H - s), x * (W - s))`` so it always stays inside the image, and it is resized to a fixed
  ``g * patch`` square sensor, so every glimpse gives ``g * g`` tokens whatever its scale.

Token coordinates are in patch units (see :mod:`avex.posembed`): integers for discrete glimpses,
floats (the centre of each sensor token mapped back onto the full image) for continuous ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["GlimpseGeometry"]


@dataclass(frozen=True)
class GlimpseGeometry:
    """Geometry of glimpses on one canvas size.

    Args:
        image_size: (H, W) of the canvas in pixels; both multiples of ``patch``.
        patch: ViT patch side in pixels.
        glimpse: glimpse side ``g`` in patches.
        stride: distance in patches between neighbouring discrete positions (1 = AME, g = tiling).
        max_ratio: largest continuous crop side as a fraction of ``min(H, W)``.
    """

    image_size: tuple[int, int]
    patch: int
    glimpse: int
    stride: int = 1
    max_ratio: float = 1.0

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {self.image_size} must be a multiple of the patch size {self.patch}")
        gh, gw = self.grid
        if not 1 <= self.glimpse <= min(gh, gw):
            raise ValueError(f"glimpse of {self.glimpse} patches does not fit the {gh}x{gw} patch grid")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if not 0.0 < self.max_ratio <= 1.0:
            raise ValueError(f"max_ratio must be in (0, 1], got {self.max_ratio}")

    # ------------------------------------------------------------------ sizes
    @property
    def grid(self) -> tuple[int, int]:
        """(gh, gw): the patch grid."""
        return self.image_size[0] // self.patch, self.image_size[1] // self.patch

    @property
    def num_patches(self) -> int:
        """N = gh * gw: patches on the grid."""
        return self.grid[0] * self.grid[1]

    @property
    def tokens_per_glimpse(self) -> int:
        """G = g * g: tokens one glimpse gives."""
        return self.glimpse * self.glimpse

    @property
    def sensor_pixels(self) -> int:
        """Side in pixels of what one glimpse hands the model: ``g * patch``."""
        return self.glimpse * self.patch

    @property
    def positions_shape(self) -> tuple[int, int]:
        """(rows, cols) of discrete glimpse positions."""
        gh, gw = self.grid
        return (gh - self.glimpse) // self.stride + 1, (gw - self.glimpse) // self.stride + 1

    @property
    def num_actions(self) -> int:
        """Discrete glimpse positions (the discrete action space's size)."""
        ph, pw = self.positions_shape
        return ph * pw

    # --------------------------------------------------------------- discrete
    def action_to_patch(self, action: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Top-left patch (row, col) of discrete actions. Raises ValueError for an action off the grid.

        Args:
            action: integer, any shape [...] (a scalar too).

        Returns:
            rows, cols: integer arrays of the same shape as ``action``.
        """
        a = np.asarray(action)
        if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() >= self.num_actions)):
            raise ValueError(
                f"action must be an integer in [0, {self.num_actions - 1}] "
                f"({self.positions_shape[0]}x{self.positions_shape[1]} glimpse positions), got {action!r}"
            )
        pw = self.positions_shape[1]
        return (a // pw) * self.stride, (a % pw) * self.stride

    def patch_to_action(self, row: np.ndarray | int, col: np.ndarray | int) -> np.ndarray:
        """Inverse of :meth:`action_to_patch` for positions on the stride lattice.

        Args:
            row, col: integer top-left patches, broadcastable shapes [...].

        Returns:
            integer actions of the broadcast shape.
        """
        return (np.asarray(row) // self.stride) * self.positions_shape[1] + np.asarray(col) // self.stride

    def glimpse_coords(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Integer patch coordinates of each glimpse's tokens, row-major within the glimpse.

        Args:
            rows, cols: int64 [B] top-left patches.

        Returns:
            int64 [B, g * g, 2]
        """
        g = self.glimpse
        off = torch.arange(g, device=rows.device)
        r = rows[:, None] + off.repeat_interleave(g)[None]
        c = cols[:, None] + off.repeat(g)[None]
        return torch.stack([r, c], dim=-1)

    def cut(self, canvases: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Cut aligned glimpses out of a batch of canvases, on the canvases' device.

        Args:
            canvases: [B, H, W, C] (any dtype, usually uint8).
            rows, cols: int64 [B] top-left patches, on the same device.

        Returns:
            [B, C, g * patch, g * patch], same dtype as ``canvases``.
        """
        s = self.sensor_pixels
        off = torch.arange(s, device=canvases.device)
        ys = rows[:, None] * self.patch + off  # [B, s]
        xs = cols[:, None] * self.patch + off
        b = torch.arange(canvases.shape[0], device=canvases.device)[:, None, None]
        return canvases[b, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)

    def boxes(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Pixel boxes (y0, x0, y1, x1) of aligned glimpses, float32 [B, 4]."""
        y0 = np.asarray(rows, dtype=np.float32) * self.patch
        x0 = np.asarray(cols, dtype=np.float32) * self.patch
        return np.stack([y0, x0, y0 + self.sensor_pixels, x0 + self.sensor_pixels], axis=-1)

    def visited_patches(self, boxes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Which grid patches a glimpse reveals: those whose centre lies inside its box.

        Args:
            boxes: [B, 4] pixel boxes (y0, x0, y1, x1).

        Returns:
            bool [B, gh, gw] (numpy in, numpy out; torch in, torch out).
        """
        gh, gw = self.grid
        lib = torch if isinstance(boxes, torch.Tensor) else np
        cy = (lib.arange(gh) + 0.5) * self.patch
        cx = (lib.arange(gw) + 0.5) * self.patch
        if lib is torch:
            cy, cx = cy.to(boxes.device), cx.to(boxes.device)
        inside_y = (cy[None, :] >= boxes[:, 0:1]) & (cy[None, :] < boxes[:, 2:3])  # [B, gh]
        inside_x = (cx[None, :] >= boxes[:, 1:2]) & (cx[None, :] < boxes[:, 3:4])  # [B, gw]
        return inside_y[:, :, None] & inside_x[:, None, :]

    # ------------------------------------------------------------- continuous
    def continuous_boxes(self, yxz: torch.Tensor) -> torch.Tensor:
        """AdaGlimpse boxes of continuous actions.

        Args:
            yxz: float [B, 3] in [0, 1].

        Returns:
            float32 [B, 4] pixel boxes (y0, x0, y1, x1), always inside the canvas.
        """
        if yxz.ndim != 2 or yxz.shape[-1] != 3:
            raise ValueError(f"continuous actions must have shape [B, 3] (y, x, z), got {tuple(yxz.shape)}")
        if not torch.isfinite(yxz).all() or yxz.min() < 0 or yxz.max() > 1:
            raise ValueError(f"continuous actions (y, x, z) must lie in [0, 1], got {yxz.tolist()}")
        h, w = self.image_size
        smin = float(self.sensor_pixels)
        smax = max(min(h, w) * self.max_ratio, smin)
        yxz = yxz.float()
        side = yxz[:, 2] * (smax - smin) + smin
        y0 = yxz[:, 0] * (h - side)
        x0 = yxz[:, 1] * (w - side)
        return torch.stack([y0, x0, y0 + side, x0 + side], dim=-1)

    def continuous_coords(self, boxes: torch.Tensor) -> torch.Tensor:
        """Float patch coordinates of the g x g sensor tokens of continuous glimpses.

        Token (i, j) covers the box's (i, j)-th sub-square; its coordinate is that sub-square's centre,
        in pixels divided by ``patch``, minus 0.5 (so an unscaled aligned glimpse gets integer coordinates).

        Args:
            boxes: float [B, 4] pixel boxes (y0, x0, y1, x1), e.g. from :meth:`continuous_boxes`.

        Returns:
            float32 [B, g * g, 2]
        """
        g = self.glimpse
        frac = (torch.arange(g, device=boxes.device, dtype=torch.float32) + 0.5) / g  # [g]
        side = (boxes[:, 2] - boxes[:, 0])[:, None]
        cy = boxes[:, 0:1] + frac[None] * side  # [B, g]
        cx = boxes[:, 1:2] + frac[None] * side
        gh, gw = self.grid
        # Inside the grid by construction; the clamp only removes float rounding (a tiny negative value at the
        # border).
        r = (cy / self.patch - 0.5).clamp(0, gh - 1)[:, :, None].expand(-1, g, g)
        c = (cx / self.patch - 0.5).clamp(0, gw - 1)[:, None, :].expand(-1, g, g)
        return torch.stack([r, c], dim=-1).reshape(boxes.shape[0], g * g, 2)

    def cut_continuous(self, canvases: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Crop boxes and resize each to the ``g * patch`` square sensor (bilinear), batched on device.

        Args:
            canvases: [B, H, W, C] uint8 or float.
            boxes: float [B, 4] pixel boxes.

        Returns:
            float32 [B, C, g * patch, g * patch] in the canvases' value range.
        """
        h, w = self.image_size
        s = self.sensor_pixels
        x = canvases.permute(0, 3, 1, 2).float()
        # Sample at the centres of the sensor's pixels, mapped into the box (align_corners=False convention).
        frac = (torch.arange(s, device=x.device, dtype=torch.float32) + 0.5) / s
        side = (boxes[:, 2] - boxes[:, 0])[:, None]
        py = boxes[:, 0:1] + frac[None] * side  # [B, s] pixel positions
        px = boxes[:, 1:2] + frac[None] * side
        gy = (py / h) * 2 - 1
        gx = (px / w) * 2 - 1
        grid = torch.stack([gx[:, None, :].expand(-1, s, -1), gy[:, :, None].expand(-1, -1, s)], dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
