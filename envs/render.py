"""Drawing an AVE episode: the canvas with hidden parts dimmed, numbered glimpse boxes, top predictions.

All functions take and return plain numpy arrays (uint8 RGB frames [H', W', 3]); PIL does the drawing
with its default font, so nothing beyond Pillow is needed. :func:`record_episode` runs an agent in an
environment and saves the frames as a GIF.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["BOX_COLORS", "canvas_image", "draw_boxes", "prediction_panel", "record_episode", "render_frame", "save_gif"]

#: Glimpse box colours, cycled in glimpse order (saturated, so they stand out on any grey canvas).
BOX_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 60, 60),
    (255, 160, 0),
    (240, 220, 0),
    (60, 210, 60),
    (0, 200, 255),
    (90, 120, 255),
    (200, 80, 255),
    (255, 80, 200),
)
_TARGET_SIDE = 448  # frames are upscaled to about this many pixels so a 112 px canvas is readable
_DIM = 0.3  # brightness of pixels not revealed yet


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def canvas_image(hidden: np.ndarray, seen: np.ndarray, dim: float = _DIM) -> np.ndarray:
    """The whole canvas, revealed pixels bright and the rest dimmed.

    Args:
        hidden: uint8 [H, W, C] (C = 1 or 3) the full canvas.
        seen: bool [H, W] revealed pixels.

    Returns:
        uint8 [H, W, 3]
    """
    img = hidden.astype(np.float32)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    img = np.where(seen[..., None], img, img * dim)
    return img.round().clip(0, 255).astype(np.uint8)


def draw_boxes(image: Image.Image, boxes: np.ndarray, scale: float) -> None:
    """Draw numbered glimpse boxes (in order) onto ``image`` in place.

    Args:
        image: RGB PIL image, ``scale`` times the canvas.
        boxes: float [T, 4] pixel boxes (y0, x0, y1, x1) on the canvas, in glimpse order.
    """
    draw = ImageDraw.Draw(image)
    width = max(2, round(scale / 2))
    font = _font(max(10, round(4 * scale)))
    for i, (y0, x0, y1, x1) in enumerate(np.asarray(boxes, dtype=np.float64)):
        color = BOX_COLORS[i % len(BOX_COLORS)]
        rect = [x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1]
        draw.rectangle(rect, outline=color, width=width)
        text = str(i + 1)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx, ty = rect[0] + width, rect[1] + width
        draw.rectangle([tx, ty, tx + right - left + 2, ty + bottom - top + 2], fill=color)
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=(0, 0, 0), font=font)


def prediction_panel(
    width: int, probs: np.ndarray, class_names: Sequence[str], label: int | None = None, top_k: int = 3
) -> np.ndarray:
    """A strip with the true label and the top-k predictions with their probabilities.

    Args:
        width: strip width in pixels.
        probs: float [classes] class probabilities.
        label: the true class, or None.

    Returns:
        uint8 [h, width, 3]
    """
    size = max(11, width // 32)
    font = _font(size)
    line = round(size * 1.4)
    k = min(top_k, len(probs))
    panel = Image.new("RGB", (width, line * (k + 1) + size // 2), (24, 24, 24))
    draw = ImageDraw.Draw(panel)
    max_chars = max(8, int(width / (0.6 * size)) - 12)

    def name(i: int) -> str:
        text = class_names[i] if i < len(class_names) else str(i)
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    pad = size // 4
    draw.text((pad, pad), f"label: {name(label)}" if label is not None else "label: ?", fill=(200, 200, 200), font=font)
    for rank, i in enumerate(np.argsort(-np.asarray(probs), kind="stable")[:k]):
        color = (90, 230, 90) if label is not None and i == label else (240, 240, 240)
        draw.text(
            (pad, pad + line * (rank + 1)), f"{rank + 1}. {name(int(i))}  {float(probs[i]):.2f}", fill=color, font=font
        )
    return np.asarray(panel, dtype=np.uint8)


def render_frame(
    hidden: np.ndarray,
    seen: np.ndarray,
    boxes: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    label: int | None = None,
    scale: int | None = None,
    top_k: int = 3,
) -> np.ndarray:
    """One picture of an episode: the dimmed canvas with glimpses revealed, boxes numbered, predictions.

    Args:
        hidden: uint8 [H, W, C]; seen: bool [H, W]; boxes: float [T, 4] (y0, x0, y1, x1) pixels;
        probs: float [classes]; class_names: one per class; label: true class or None.
        scale: integer upscaling (None: about 448 px on the longer side).

    Returns:
        uint8 [scale * H + panel, scale * W, 3]
    """
    h, w = hidden.shape[:2]
    scale = scale or max(1, math.ceil(_TARGET_SIDE / max(h, w)))
    base = canvas_image(hidden, seen).repeat(scale, axis=0).repeat(scale, axis=1)
    image = Image.fromarray(base)
    draw_boxes(image, boxes, scale)
    panel = prediction_panel(w * scale, probs, class_names, label, top_k)
    return np.concatenate([np.asarray(image, dtype=np.uint8), panel], axis=0)


def save_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float = 2.0) -> Path:
    """Write uint8 [H, W, 3] frames as a looping GIF. Returns the path."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def record_episode(
    env: Any,
    agent_fn: Callable[[dict[str, Any], dict[str, Any]], Any],
    path: str | Path | None = None,
    fps: float = 2.0,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
) -> list[np.ndarray]:
    """Run one episode of an AVE environment and record a frame after reset and after every glimpse.

    Args:
        env: an :class:`envs.AVEEnv` (wrapped or not).
        agent_fn: ``agent_fn(obs, info) -> action`` (``info["action_mask"]`` says which actions are allowed).
        path: where to save a GIF (None: do not save).
        seed, options: passed to ``env.reset``.

    Returns:
        The frames, uint8 [H', W', 3] each.
    """
    obs, info = env.reset(seed=seed, options=options)
    frames = [env.unwrapped.frame()]
    done = False
    while not done:
        obs, _, terminated, truncated, info = env.step(agent_fn(obs, info))
        frames.append(env.unwrapped.frame())
        done = terminated or truncated
    if path is not None:
        save_gif(frames, path, fps)
    return frames
