"""Plot PPO training curves (greedy accuracy against env-steps) from policy JSONs' ``eval_history``.

Usage: python benchmarks/ppo_curves.py benchmarks/results/ppo/sweep_*.json --out benchmarks/results/ppo/curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="policy JSONs (avex train ppo --eval-every N)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4))
    for f in args.files:
        run = json.loads(f.read_text())
        steps = [h["step"] / 1e6 for h in run["eval_history"]]
        acc = [100 * h["accuracy"] for h in run["eval_history"]]
        ax.plot(steps, acc, marker="o", ms=3, label=f"{f.stem} (K={run.get('K')})")
    ax.set(xlabel="env-steps (millions)", ylabel="greedy accuracy after 12 glimpses (%)", title="avex train ppo")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
