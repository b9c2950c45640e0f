"""Which attention kernel is fastest for TORE's short sequences? Time per call of every SDPA backend.

TORE's iterator attends over P + G tokens per glimpse (5 for CLS + 2x2 patches) and the aggregator over
P + t*G (up to 49 after 12 glimpses), for thousands of rows at once: shapes where a kernel's fixed cost
per (row, head) block, not arithmetic, decides. Each (shape, backend) is timed as a CUDA graph of 20 calls
(no launch overhead), median of 20 replays, CUDA events.

The SDPA columns take q, k, v ready as [B, H, S, Dh]. A ViT block has them packed in its qkv
projection's output [B, S, 3*H*Dh] and needs the result as [B, S, H*Dh]; the "from qkv" columns time that
whole step: ``avex.attention.reference_attention`` (permute, SDPA with the memory-efficient kernel,
transpose-and-copy) against ``avex.attention.short_attention`` (avex's Triton kernel, which reads and
writes those layouts directly).

    python benchmarks/sdpa_short.py --out results/sdpa_short.md

``--train`` adds training's attention (forward and backward of ``avex.train.kernels.train_attention``): its Triton
kernels against the SDPA path it takes above ``TRAIN_SHORT`` tokens, on a training step's aggregator rows.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's timer, as a test loads it by path
from env_kernels import per_call_us  # noqa: E402

from avex.attention import SHORT_SEQUENCE, _launch, reference_attention, short_attention, short_attention_available
from avex.platform_info import device_name

BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
# (label, rows, heads, head_dim): ViT-B/16 at batch 256; the Fashion-MNIST env's ViT (width 192) at 16,384 envs.
MODELS = [("ViT-B/16, batch 256", 256, 12, 64), ("depth-6 width-192 ViT, 16,384 envs", 16384, 3, 64)]


def time_call(fn, reps: int = 20, calls: int = 20) -> float:
    """Median microseconds per call of ``fn`` (a CUDA graph of ``calls`` calls, ``reps`` replays)."""
    return per_call_us(fn, torch.device("cuda"), calls, reps)


def tune(seqs: list[int]) -> list[str]:
    """Microseconds per call of the Triton kernel for each launch setting; * marks its default (_launch)."""
    lines = ["## Triton kernel launch settings (block_s x num_warps), microseconds per call, * = default", ""]
    for label, rows, heads, hd in MODELS:
        lines += [
            f"### {label}",
            "",
            "| S | " + " | ".join(f"{w} warps" for w in (1, 2, 4, 8)) + " |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in (s for s in seqs if s <= SHORT_SEQUENCE):
            qkv = torch.randn(rows, s, 3 * heads * hd, device="cuda", dtype=torch.bfloat16)
            blocks = [max(16, 1 << (s - 1).bit_length())]
            for bs in blocks:
                cells = []
                for w in (1, 2, 4, 8):
                    t = time_call(partial(short_attention, qkv, heads, block_s=bs, num_warps=w))
                    cells.append(f"{t:.1f}" + ("*" if (bs, w) == _launch(s) else ""))
                lines.append(f"| {s} (block {bs}) | " + " | ".join(cells) + " |")
            del qkv
        lines.append("")
    return lines


# (label, rows, heads, head_dim) of a training step's aggregator: 1,024 images of the shipped architecture (width
# 192) and of DeiT-III-S (width 384).
TRAIN_MODELS = [("shipped architecture, batch 1,024", 1024, 3, 64), ("DeiT-III-S, batch 1,024", 1024, 6, 64)]


def train_tables(seqs: list[int]) -> list[str]:
    """Forward and backward of ``avex.train.kernels.train_attention`` per call, its Triton kernels against the SDPA
    path it takes above ``TRAIN_SHORT`` tokens (each forced by setting ``TRAIN_SHORT``), bf16."""
    import avex.train.kernels as kernels

    lines = ["## Training attention, forward and backward, microseconds per call", ""]
    keep = kernels.TRAIN_SHORT
    for label, rows, heads, hd in TRAIN_MODELS:
        lines += [f"### {label}: qkv [{rows}, S, {3 * heads * hd}]", "", "| S | Triton | SDPA | SDPA / Triton |"]
        lines.append("|---:|---:|---:|---:|")
        for s in seqs:
            qkv = torch.randn(rows, s, 3 * heads * hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dout = torch.randn(rows, s, heads * hd, device="cuda", dtype=torch.bfloat16)

            def step(qkv=qkv, dout=dout, heads=heads) -> torch.Tensor:
                return torch.autograd.grad(kernels.train_attention(qkv, heads), qkv, dout)[0]

            times = []
            for short in (s, 0):  # the kernels take it, then they do not
                kernels.TRAIN_SHORT = short
                try:
                    times.append(time_call(step) if s <= kernels._MAX_TOKENS or short == 0 else None)
                except RuntimeError:
                    times.append(None)
            kernels.TRAIN_SHORT = keep
            tri, sdpa = times
            ratio = f"{sdpa / tri:.2f}" if tri and sdpa else "-"
            cells = " | ".join("-" if t is None else f"{t:.1f}" for t in times)
            lines.append(f"| {s} | {cells} | {ratio} |")
            del qkv, dout
        lines.append("")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[5, 9, 17, 33, 49, 65, 197])
    p.add_argument("--out", default=None)
    p.add_argument("--train", action="store_true", help="also time training's attention, forward and backward")
    p.add_argument(
        "--tune", action="store_true", help="also time the Triton kernel's launch settings (block_s, num_warps)"
    )
    args = p.parse_args()
    lines = [
        f"# SDPA per call on short sequences, bf16, {device_name('cuda')}, torch {torch.__version__}",
        "",
        "command: `python benchmarks/sdpa_short.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "microseconds per call (CUDA graph of 20 calls, median of 20 replays); '-' = backend refused the shape",
        "",
    ]
    for label, rows, heads, hd in MODELS:
        cols = [*BACKENDS, "efficient from qkv", "triton from qkv"]
        lines += [
            f"## {label}: q, k, v [{rows}, {heads}, S, {hd}]",
            "",
            "| S | " + " | ".join(cols) + " | fastest |",
            "|---:|" + "---:|" * (len(cols) + 1),
        ]
        for s in args.seq:
            q, k, v = (torch.randn(rows, heads, s, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            row = {}
            for name, backend in BACKENDS.items():
                try:
                    with sdpa_kernel([backend]):
                        row[name] = time_call(partial(F.scaled_dot_product_attention, q, k, v))
                except RuntimeError:
                    row[name] = None
            qkv = torch.randn(rows, s, 3 * heads * hd, device="cuda", dtype=torch.bfloat16)
            with sdpa_kernel([BACKENDS["efficient"]]):
                row["efficient from qkv"] = time_call(partial(reference_attention, qkv, heads))
            ok = short_attention_available() and s <= SHORT_SEQUENCE
            row["triton from qkv"] = time_call(partial(short_attention, qkv, heads)) if ok else None
            best = min((t, n) for n, t in row.items() if t is not None)[1]
            lines.append(
                f"| {s} | " + " | ".join("-" if t is None else f"{t:.1f}" for t in row.values()) + f" | {best} |"
            )
            del q, k, v, qkv
        lines.append("")
    if args.tune and short_attention_available():
        lines += tune(args.seq)
    if args.train and short_attention_available():
        lines += train_tables(args.seq)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
