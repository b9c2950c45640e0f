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
kernels (register ones up to ``TRAIN_SHORT`` tokens, blocked ones up to ``TRAIN_BLOCKED``) against the SDPA path it
takes beyond, on a training step's aggregator rows, and on the glimpse decoder's (first_query > 0).

    python benchmarks/sdpa_short.py --train --seq 65 128 129 197 256 --out results/sdpa_train.md
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
# (label, rows, tokens, heads, head_dim, first_query values) of the glimpse decoder's last block in a training step:
# CLS + a 14x14 grid, the unseen patches (from first_query on) as queries.
DECODER_ROWS = [("glimpse decoder, batch 1,024", 1024, 197, 4, 32, (49, 1))]


def _train_us(
    qkv: torch.Tensor, dout: torch.Tensor, heads: int, first_query: int, short: int, blocked: int
) -> float | None:
    """Microseconds per forward and backward of ``train_attention`` with ``TRAIN_SHORT`` and ``TRAIN_BLOCKED`` set to
    ``short`` and ``blocked`` (0: that family off), or None where the family meant to run does not take the call."""
    import avex.train.kernels as kernels

    keep = kernels.TRAIN_SHORT, kernels.TRAIN_BLOCKED
    kernels.TRAIN_SHORT, kernels.TRAIN_BLOCKED = short, blocked
    try:
        if short and not (first_query == 0 and kernels.short_kernel_applies(qkv, heads)):
            return None
        if blocked and not kernels.blocked_kernel_applies(qkv, heads, first_query):
            return None

        def step() -> torch.Tensor:
            return torch.autograd.grad(kernels.train_attention(qkv, heads, first_query), qkv, dout)[0]

        return time_call(step)
    except RuntimeError:
        return None
    finally:
        kernels.TRAIN_SHORT, kernels.TRAIN_BLOCKED = keep


def _cells(times: list[float | None]) -> str:
    """The table cells of ``times`` (SDPA's last), then SDPA's time over the fastest Triton kernel's."""
    *tri, sdpa = times
    best = min((t for t in tri if t), default=None)
    ratio = f"{sdpa / best:.2f}" if best and sdpa else "-"
    return " | ".join("-" if t is None else f"{t:.1f}" for t in times) + f" | {ratio} |"


def train_tables(seqs: list[int]) -> list[str]:
    """Forward and backward of ``avex.train.kernels.train_attention`` per call, bf16: its register kernels (up to
    128 tokens) and its blocked kernels (up to 256) against the SDPA path it takes beyond (each forced by setting
    ``TRAIN_SHORT`` and ``TRAIN_BLOCKED``); then the glimpse decoder's rows (first_query > 0: blocked or SDPA)."""
    lines = ["## Training attention, forward and backward, microseconds per call", ""]
    for label, rows, heads, hd in TRAIN_MODELS:
        lines += [f"### {label}: qkv [{rows}, S, {3 * heads * hd}]", ""]
        lines += [
            "| S | Triton, register | Triton, blocked | SDPA | SDPA / fastest Triton |",
            "|---:|---:|---:|---:|---:|",
        ]
        for s in seqs:
            qkv = torch.randn(rows, s, 3 * heads * hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dout = torch.randn(rows, s, heads * hd, device="cuda", dtype=torch.bfloat16)
            times = [_train_us(qkv, dout, heads, 0, *mode) for mode in ((s, 0), (0, s), (0, 0))]
            lines.append(f"| {s} | {_cells(times)}")
            del qkv, dout
        lines.append("")
    for label, rows, s, heads, hd, firsts in DECODER_ROWS:
        lines += [f"### {label}: qkv [{rows}, {s}, {3 * heads * hd}], queries from first_query on", ""]
        lines += ["| first_query | Triton, blocked | SDPA | SDPA / Triton |", "|---:|---:|---:|---:|"]
        for fq in firsts:
            qkv = torch.randn(rows, s, 3 * heads * hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dout = torch.randn(rows, s - fq, heads * hd, device="cuda", dtype=torch.bfloat16)
            times = [_train_us(qkv, dout, heads, fq, *mode) for mode in ((0, s), (0, 0))]
            lines.append(f"| {fq} | {_cells(times)}")
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
            row: dict[str, float | None] = {}
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
