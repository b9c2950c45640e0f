"""Report of a DDP scaling job (``benchmarks/gpu/ddp.sh``): images/s per GPU and the loss curves, 1 vs 2 GPUs.

Reads the folder the job packed and writes a Markdown table and a plot of the losses per kind of run found:

* ``speed_{name}_np{P}.json`` (``benchmarks/train_speed.py --json`` under ``torchrun``): the steady-state step,
  every graph captured, timed over the same step indices on 1 and 2 GPUs; both passes' losses (ranks' means);
  -> ``ddp_speed.md``, ``ddp_speed_loss.png``;
* ``ddp{tag}_b{B}_np{P}.log`` with the trainer's summary line, ``.jsonl`` with the per-step losses and ``.cmd``
  with the command (``avex train classifier`` under ``torchrun``; its images/s leave out the first interval,
  graph captures included) -> ``ddp{tag}.md``, ``ddp{tag}_loss.png``.

Scaling efficiency: images/s per GPU on 2 GPUs over images/s on 1, at the same global batch.

    python benchmarks/ddp_report.py <job folder> --out <folder>
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

SUMMARY = re.compile(r"\[avex\.train\] (\d+) steps in ([\d.]+) s, (\d+) images/s per process")
LOSS_HEAD = "loss: mean abs diff (max) vs 1 GPU"


def read_run(folder: Path, batch: int, procs: int, tag: str = "") -> dict:
    """The summary figures and per-step losses of one trainer run."""
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


def read_speed(path: Path) -> dict:
    """One ``train_speed.py --json`` file's first mode, with its command."""
    data = json.loads(path.read_text())
    run = data["results"][0]
    return dict(run, loss=np.array(run["all_losses"]), cmd=data["command"], device=data["device"], date=data["date"])


def _diff(one: np.ndarray, two: np.ndarray) -> str:
    n = min(len(one), len(two))
    diff = np.abs(one[:n] - two[:n])
    return f"{diff.mean():.4f} ({diff.max():.4f}) over {n} steps"


def _plot(panels: list[tuple[str, dict, dict]], path: Path) -> None:
    """One panel per (title, 1-GPU run, 2-GPU run): the two loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, one, two) in zip(axes[0], panels):
        ax.plot(one["loss"], label="1 GPU", lw=1)
        ax.plot(two["loss"], label="2 GPUs (DDP)", lw=1, ls="--")
        ax.set(title=title, xlabel="step", ylabel="training loss (CE + 0.1 MSE)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _write(out: Path, stem: str, rows: list[str], runs: list[dict], panels: list[tuple[str, dict, dict]]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    _plot(panels, out / f"{stem}_loss.png")
    cmds = "\n".join(f"    {run['cmd']}" for run in runs)
    text = "\n".join(rows) + "\n\nCommands (one per row, in order):\n\n" + cmds + "\n"
    (out / f"{stem}.md").write_text(text)
    return text


def speed_report(folder: Path, out: Path) -> str | None:
    """The table of the ``speed_*`` runs (None: the folder has none)."""
    names = sorted(m[1] for p in folder.glob("speed_*_np1.json") if (m := re.fullmatch(r"speed_(.+)_np1", p.stem)))
    if not names:
        return None
    rows = [
        "| run | model | global batch | GPUs | ms per step | images/s total | images/s per GPU | scaling efficiency "
        f"| {LOSS_HEAD} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    runs: list[dict[str, Any]] = []
    panels, notes = [], []
    for name in names:
        one, two = (read_speed(folder / f"speed_{name}_np{p}.json") for p in (1, 2))
        local = folder / f"speed_{name}_local.json"  # one GPU at the per-GPU batch (ddp.sh's LOCAL=1)
        alone = read_speed(local) if local.exists() else None
        for r in (one, two, alone):
            if r is None:
                continue
            eff = r["img_s_per_gpu"] / one["img_s"]
            bold = "**" * (r is two)
            rows.append(
                f"| {name} | {r['arch']} ({r['step']} step) | {r['batch']} | {r['world']}{' (alone)' * (r is alone)} "
                f"| {r['ms']:.2f} | {r['img_s']:,.0f} | {r['img_s_per_gpu']:,.0f} | {bold}{eff:.2f}{bold} "
                f"| {_diff(one['loss'], r['loss']) if r is two else ''} |"
            )
            runs.append(r)
        panels.append((f"{name}: global batch {one['batch']}", one, two))
        if alone is not None:
            notes.append(
                f"- {name}: one GPU alone at the per-GPU batch {alone['batch']} keeps "
                f"{alone['img_s'] / one['img_s']:.2f} of its images/s at {one['batch']} (the smaller batch's share of "
                f"the loss); the 2-GPU step minus that GPU's step alone: {two['ms'] - alone['ms']:+.2f} ms (the "
                "all-reduce and the ranks waiting for each other)."
            )
    head = f"{runs[0]['device']}, {runs[0]['date']}: steady state (every graph captured), the same step indices.\n\n"
    return head + _write(out, "ddp_speed", rows + [""] * bool(notes) + notes, runs, panels)


def trainer_report(folder: Path, out: Path, tag: str) -> str | None:
    """The table of the trainer runs ``ddp{tag}_b*`` (None: the folder has none)."""
    pattern = rf"ddp{re.escape(tag)}_b(\d+)_np1"
    batches = sorted({int(m[1]) for p in folder.glob(f"ddp{tag}_b*_np1.log") if (m := re.fullmatch(pattern, p.stem))})
    if not batches:
        return None
    rows = [
        "| global batch | GPUs | steps | seconds | images/s per GPU | images/s total | scaling efficiency "
        f"| {LOSS_HEAD} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    runs, panels = [], []
    for b in batches:
        one, two = read_run(folder, b, 1, tag), read_run(folder, b, 2, tag)
        eff = two["img_s_per_gpu"] / one["img_s_per_gpu"]
        rows.append(
            f"| {b} | 1 | {one['steps']} | {one['seconds']:.1f} | {one['img_s_per_gpu']:.0f} "
            f"| {one['img_s_per_gpu']:.0f} | 1.00 | |"
        )
        rows.append(
            f"| {b} | 2 | {two['steps']} | {two['seconds']:.1f} | {two['img_s_per_gpu']:.0f} "
            f"| {2 * two['img_s_per_gpu']:.0f} | **{eff:.2f}** | {_diff(one['loss'], two['loss'])} |"
        )
        runs += [one, two]
        panels.append((f"global batch {b}", one, two))
    return _write(out, f"ddp{tag}", rows, runs, panels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="", help="the job's TAG (trainer runs named ddp{TAG}_b{B}_np{P})")
    args = ap.parse_args()
    texts = [t for t in (speed_report(args.folder, args.out), trainer_report(args.folder, args.out, args.tag)) if t]
    if not texts:
        raise SystemExit(f"no speed_*_np1.json and no ddp{args.tag}_b*_np1.log in {args.folder}")
    print("\n".join(texts))


if __name__ == "__main__":
    main()
