"""A synthetic ImageNet-layout folder of real JPEGs at ImageNet sizes, for timing the data path without ImageNet.

Writes ``<out>/<split>/<wnid>/ILSVRC2012_val_<n>.JPEG``: ``--files`` images spread evenly over ``--classes``
real WordNet ids (every tenth of timm's ImageNet-1k list, which ``avex.data.imagenet`` reads, so
``AVE-ImageNet-v0`` accepts the folder). Each image is about 500x375 (landscape or portrait, long side 375 to
640, aspect 1 to 16:9, as ImageNet's are), smooth shapes over a smooth background with a noise texture, saved
at JPEG quality 90: about 100 KB, as an ImageNet photo, so decoding costs what a real one does (about 4 ms
at 224 px on one core). Image ``i`` depends only on ``--seed`` and ``i``: the folder is the same for any
``--workers``.

    python benchmarks/make_jpeg_folder.py --out /tmp/jpeg-imagenet              # 20,000 files, all cores
    python benchmarks/make_jpeg_folder.py --out /tmp/small --files 200 --classes 4 --workers 1
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def synthetic_photo(rng: np.random.Generator) -> Image.Image:
    """One RGB image of about 500x375 px: a smooth background, 3-8 blurred shapes, a noise texture."""
    long = int(rng.choice([500] * 6 + [375, 400, 450, 640]))
    aspect = float(rng.choice([4 / 3] * 5 + [3 / 2, 1.0, 16 / 9]))
    w, h = long, max(1, round(long / aspect))
    if rng.random() < 0.2:  # portrait
        w, h = h, w
    grid = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)  # a few colours, smoothly blended
    img = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(2)), dtype=np.int16)
    # Texture: grey noise at half resolution plus colour noise per pixel (sizes the JPEG like a photo's).
    coarse = int(rng.integers(14, 26))
    texture = rng.integers(-coarse, coarse + 1, (h // 2 + 1, w // 2 + 1, 1), dtype=np.int16)
    texture = np.repeat(np.repeat(texture, 2, axis=0), 2, axis=1)[:h, :w]
    fine = int(rng.integers(22, 34))
    noise = rng.integers(-fine, fine + 1, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels + texture + noise, 0, 255).astype(np.uint8))


def _write(job: tuple[Path, int, int]) -> int:
    """Write image ``i`` to ``path``; returns its size in bytes."""
    path, seed, i = job
    synthetic_photo(np.random.default_rng([seed, i])).save(path, "JPEG", quality=90)
    return path.stat().st_size


def make_folder(out: Path, files: int, classes: int, split: str, seed: int, workers: int) -> dict[str, float]:
    """Write the folder (see the module docstring); returns counts, bytes and seconds."""
    from avex.data.imagenet import imagenet_classes  # timm's ImageNet-1k list, as the env reads it

    wnids = imagenet_classes()[0][:: max(1, 1000 // classes)][:classes]
    jobs = []
    for i in range(files):
        folder = out / split / wnids[i % len(wnids)]
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG", seed, i))
    start = time.perf_counter()
    if workers == 1:
        sizes = [_write(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            sizes = list(pool.map(_write, jobs, chunksize=64))
    seconds = time.perf_counter() - start
    return dict(files=files, classes=len(wnids), mean_kb=float(np.mean(sizes)) / 1e3, seconds=seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write <split>/<wnid>/*.JPEG under")
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--classes", type=int, default=100, help="WordNet ids (at most 1000)")
    p.add_argument("--split", default="val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    if not 1 <= args.classes <= 1000 or args.files < 1 or args.workers < 1:
        p.error("--classes must be in 1..1000, --files and --workers at least 1")
    r = make_folder(Path(args.out), args.files, args.classes, args.split, args.seed, args.workers)
    print(
        f"{r['files']} JPEGs over {r['classes']} classes in {Path(args.out) / args.split}: "
        f"mean {r['mean_kb']:.0f} KB, {r['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
