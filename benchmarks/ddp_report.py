"""Report of a DDP scaling run (``benchmarks/gpu/ddp.sh``): images/s per GPU and the loss curves, 1 vs 2 GPUs.

Reads the folder the job packed (``ddp_b{B}_np{P}.log`` with the trainer's summary line, ``.jsonl`` with
the per-step losses, ``.cmd`` with the command) and writes a Markdown table and a plot of the losses.

    python benchmarks/ddp_report.py <job folder> --out <folder>
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

SUMMARY = re.compile(r"\[avex\.train\] (\d+) steps in ([\d.]+) s, (\d+) images/s per process")


def read_run(folder: Path, batch: int, procs: int, tag: str = "") -> dict:
    """The summary figures and per-step losses of one run."""
    stem = folder / f"ddp{tag}_b{batch}_np{procs}"
    match = SUMMARY.search(stem.with_suffix(".log").read_text())
    if match is None:
        raise ValueError(
            f"{stem}.log has no '[avex.train] N steps in S s, R images/s per process' line: did the run finish?"
        )
    steps = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
    return dict(
        steps=int(match[1]),
        seconds=float(match[2]),
        img_s_per_gpu=float(match[3]),
        loss=np.array([s["loss"] for s in steps]),
        cmd=stem.with_suffix(".cmd").read_text().strip(),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="", help="the job's TAG (runs named ddp{TAG}_b{B}_np{P})")
    args = ap.parse_args()
    tag = args.tag
    batches = sorted(
        {
            int(m[1])
            for p in args.folder.glob(f"ddp{tag}_b*_np1.log")
            if (m := re.fullmatch(rf"ddp{tag}_b(\d+)_np1", p.stem))
        }
    )
    if not batches:
        raise SystemExit(f"no ddp{tag}_b*_np1.log in {args.folder}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [
        "| global batch | GPUs | steps | seconds | images/s per GPU | images/s total | scaling efficiency "
        "| loss: mean abs diff (max) vs 1 GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    runs = {(b, p): read_run(args.folder, b, p, tag) for b in batches for p in (1, 2)}
    for ax, b in zip(axes[0], batches):
        one, two = runs[b, 1], runs[b, 2]
        n = min(len(one["loss"]), len(two["loss"]))
        diff = np.abs(one["loss"][:n] - two["loss"][:n])
        eff = two["img_s_per_gpu"] / one["img_s_per_gpu"]
        rows.append(
            f"| {b} | 1 | {one['steps']} | {one['seconds']:.1f} | {one['img_s_per_gpu']:.0f} "
            f"| {one['img_s_per_gpu']:.0f} | 1.00 | |"
        )
        rows.append(
            f"| {b} | 2 | {two['steps']} | {two['seconds']:.1f} | {two['img_s_per_gpu']:.0f} "
            f"| {2 * two['img_s_per_gpu']:.0f} | "
            f"**{eff:.2f}** | {diff.mean():.4f} ({diff.max():.4f}) over {n} steps |"
        )
        ax.plot(one["loss"], label="1 GPU", lw=1)
        ax.plot(two["loss"], label="2 GPUs (DDP)", lw=1, ls="--")
        ax.set(title=f"global batch {b}", xlabel="step", ylabel="training loss (CE + 0.1 MSE)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"ddp{tag}_loss.png", dpi=110)
    cmds = "\n".join(f"    {run['cmd']}" for run in runs.values())
    text = "\n".join(rows) + "\n\nCommands (one per row, in order):\n\n" + cmds + "\n"
    (args.out / f"ddp{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
