"""The classifier's evaluation during and after training: top-1 accuracy per split point K x glimpse count.

Not to be confused with ``agents.evaluate``, which plays whole episodes with a glimpse policy; here the
glimpses are random and the question is only how well one set of weights classifies at every K.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from avex.geometry import GlimpseGeometry
from avex.model import TOREViT
from avex.train.policy import cut_glimpses, n_tiles, sample_glimpses
from avex.train.runtime import autocast

__all__ = ["EVAL_GLIMPSES", "EVAL_SEED", "eval_columns", "eval_markdown", "eval_summary", "evaluate_classifier"]

EVAL_GLIMPSES = (1, 2, 4, 8, 12)  # glimpse counts of the validation table (up to the budget), plus "all"
EVAL_SEED = 20251117  # fixed: every run is evaluated on the same canvases and glimpses


def eval_columns(budget: int, geo: GlimpseGeometry) -> list[int | str]:
    """Glimpse counts of the table: 1, 2, 4, 8, 12 up to the budget, the budget, then 'all' when g tiles the grid."""
    counts = [t for t in sorted({t for t in EVAL_GLIMPSES if t <= budget} | {budget}) if t <= n_tiles(geo)]
    cols: list[int | str] = list(counts)
    if geo.grid[0] % geo.glimpse == 0 and geo.grid[1] % geo.glimpse == 0:
        cols.append("all")
    return cols


@torch.inference_mode()
def evaluate_classifier(
    model: TOREViT,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    geo: GlimpseGeometry,
    ks: Sequence[int],
    columns: Sequence[int | str],
    amp: bool = True,
) -> dict[str, Any]:
    """Top-1 accuracy (%) for every K in ``ks`` and glimpse count in ``columns``.

    Glimpses are random, non-overlapping, shift included, drawn from a fixed seed per (batch, count),
    so every K sees the same glimpses; 'all' reveals every patch (``model.tile``).

    Args:
        batches: (canvases uint8 [B, H, W, C], labels int64 [B]) on the model's device.

    Returns:
        dict(ks, columns, n, acc={"K=k": {"count": accuracy}}).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = {(k, str(c)): 0 for k in ks for c in columns}
    n = 0
    for bi, (canvases, labels) in enumerate(batches):
        b = len(labels)
        for c in columns:
            if c == "all":
                pixels, coords = model.tile(canvases.permute(0, 3, 1, 2), geo.glimpse)
            else:
                gen = torch.Generator(device=device)
                gen.manual_seed(EVAL_SEED + 1000 * bi + int(c))
                pixels, coords, _ = cut_glimpses(geo, canvases, *sample_glimpses(geo, b, int(c), gen))
            for k in ks:
                with autocast(device, amp):
                    logits = model.forward_glimpses(pixels, coords, k).logits
                correct[(k, str(c))] += int((logits.argmax(-1) == labels).sum())
        n += b
    model.train(was_training)
    acc = {f"K={k}": {str(c): 100.0 * correct[(k, str(c))] / max(n, 1) for c in columns} for k in ks}
    return dict(ks=list(ks), columns=[str(c) for c in columns], n=n, acc=acc)


def eval_markdown(table: dict[str, Any]) -> str:
    """The evaluation table as Markdown: rows K, columns glimpse counts."""
    cols = table["columns"]
    lines = [
        f"Top-1 accuracy (%) on {table['n']} images; columns: glimpses (random, non-overlapping), 'all': every patch.",
        "",
        "| K | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for k in table["ks"]:
        lines.append(f"| {k} | " + " | ".join(f"{table['acc'][f'K={k}'][c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def eval_summary(table: dict[str, Any], budget: int) -> str:
    """One line per table: for every K, the accuracy with every patch ('all') and after ``budget`` glimpses."""
    return ", ".join(
        f"{k} all {row.get('all', float('nan')):.1f} / {budget} {row.get(str(budget), float('nan')):.1f}"
        for k, row in table["acc"].items()
    )
