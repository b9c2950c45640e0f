"""Why does K=depth fall short with every patch revealed? Accuracy of a checkpoint, every patch revealed,
at K = 0, depth/2, depth, on either split and for several clutter counts.

Canvases and evaluation are the trainer's own (``avex.train``: the fixed evaluation layouts of the first
``--images`` items, every patch as non-overlapping 2x2 glimpses), so the figures compare with the
training tables. A train-vs-test gap shows over-fitting; clutter 0 shows what the bag of glimpses
reaches without distractors.

    python benchmarks/k_depth_probe.py [--checkpoint CKPT] [--splits train test] [--clutter 0 4] [--images 2000]
"""

from __future__ import annotations

import argparse
import time

import torch

from avex.checkpoint import load_tore, shipped_checkpoint
from avex.data import get_dataset
from avex.train import eval_batches, evaluate_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="avex checkpoint (default: the shipped Fashion-MNIST one)")
    p.add_argument("--splits", nargs="+", default=["train", "test"], choices=("train", "test"))
    p.add_argument("--clutter", type=int, nargs="+", default=[4], help="clutter fragments per canvas (the env: 4)")
    p.add_argument("--images", type=int, default=2000, help="canvases per split and clutter count")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    dev = torch.device(args.device)
    model = load_tore(args.checkpoint or shipped_checkpoint("fashion-mnist"), device=dev)
    geo = model.geometry(int(model.meta.get("glimpse", 2)))
    ks = model.report_ks
    print(f"| split | clutter | {' | '.join(f'K={k}' for k in ks)} |\n|---|---|{'---|' * len(ks)}")
    for split in args.splits:
        for clutter in args.clutter:
            spec = get_dataset("fashion-mnist")
            source = spec.make_source(split=split, image_size=model.img_size, device=dev, clutter=clutter)
            t0 = time.perf_counter()
            batches = eval_batches(source, 500, dev, args.images)
            table = evaluate_classifier(model, batches, geo, ks, ["all"], amp=dev.type == "cuda")
            accs = " | ".join(f"{table['acc'][f'K={k}']['all']:.2f}" for k in ks)
            print(
                f"| {split} | {clutter} | {accs} |  ({table['n']} canvases, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
