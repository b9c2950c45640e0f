"""One Markdown row per classifier run: top-1 with every patch and after 12 random glimpses at K = 0, 3, 6.

Reads the final evaluation tables (``<tag>.eval.json``, written by ``avex train classifier``) in a results folder;
issue 18's item 4 asks about exactly these columns (every patch within 1 point of a specialist at each K, >= 80
after 12 random glimpses at K=3).

Usage:  python benchmarks/eval_summary.py RESULTS_DIR TAG [TAG ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(acc: dict, k: int, column: str) -> str:
    value = acc.get(f"K={k}", {}).get(column)
    return "-" if value is None else f"{value:.2f}"


def summary(root: Path, tags: list[str]) -> str:
    """The table: a row per tag; a run without its final table (timed out) says so."""
    lines = [
        "| variant | K=0 all | K=3 all | K=6 all | K=0 @12 | K=3 @12 | K=6 @12 | images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tag in tags:
        path = root / f"{tag}.eval.json"
        if not path.exists():
            lines.append(f"| {tag} | no final evaluation (timed out?) | | | | | | |")
            continue
        table = json.loads(path.read_text())
        cells = [_cell(table["acc"], k, c) for c in ("all", "12") for k in (0, 3, 6)]
        lines.append(f"| {tag} | " + " | ".join(cells) + f" | {table['n']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]), sys.argv[2:]))
