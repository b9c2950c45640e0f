"""The training MLP's two Triton products (``avex.train.mlp``), timed against what they replace, per launch setting.

At a training step's row counts and widths (bf16, CUDA graphs): fc1 with its bias and GELU (``fc1_gelu``) against
cuBLAS's ``F.linear`` with the bias then PyTorch's GELU; the backward's product through fc2 with the GELU's slope
and fc1's bias gradient (``gelu_input_grad``) against ``dy @ W2``, PyTorch's GELU backward and
``avex.train.rows.column_sum``; and the whole branch forward and backward (``train_mlp`` against the same
composition under autograd). Each kernel is timed for every setting of a short grid (``MLP_LAUNCH`` changed one
entry at a time); the last line, ``fastest: {'MLP_LAUNCH': {...}}``, is what ``benchmarks/gpu/rows_tune.sh``
sets for a run of the step. ``--device cpu`` runs it under Triton's interpreter on tiny shapes (a check of the
script, not a measure).

    python benchmarks/mlp_sweep.py --out results/mlp_sweep.md
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from env_kernels import per_call_us  # noqa: E402

from avex.platform_info import device_name, synchronize  # noqa: E402
from avex.train import mlp as M  # noqa: E402
from avex.train.rows import column_sum  # noqa: E402

DEFAULTS = dict(M.MLP_LAUNCH)
# (block_m, block_n, block_k, num_warps, num_stages): the default first.
GRID = [
    M.MlpLaunch(128, 128, 64, 8, 3),
    M.MlpLaunch(128, 128, 64, 4, 3),
    M.MlpLaunch(128, 256, 64, 8, 3),
    M.MlpLaunch(256, 128, 64, 8, 3),
    M.MlpLaunch(64, 128, 64, 4, 3),
    M.MlpLaunch(128, 64, 64, 4, 3),
    M.MlpLaunch(64, 256, 64, 8, 3),
    M.MlpLaunch(128, 128, 32, 4, 4),
    M.MlpLaunch(128, 256, 32, 8, 4),
    M.MlpLaunch(128, 128, 64, 8, 2),
]


def _inputs(m: int, d: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """x [m, d], w1 [4d, d], b1 [4d], w2 [d, 4d], dy [m, d]."""
    g = torch.Generator(device=device).manual_seed(0)
    f = 4 * d
    shapes = [(m, d), (f, d), (f,), (d, f), (m, d)]
    return [(torch.randn(s, device=device, generator=g) * 0.5).to(dtype) for s in shapes]


def _calls(m: int, d: int, device: str, dtype: torch.dtype) -> dict[str, tuple[Callable[[], object], ...]]:
    """Per kernel: (the PyTorch composition it replaces, the Triton call), on the same inputs."""
    x, w1, b1, w2, dy = _inputs(m, d, device, dtype)
    pre = F.linear(x, w1, b1)
    leaves = [t.detach().requires_grad_() for t in (x, w1, b1, w2)]

    def branch(fn: Callable[..., torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(*leaves), leaves, dy)

    return {
        "fc1_gelu": (lambda: F.gelu(F.linear(x, w1, b1)), lambda: M.fc1_gelu(x, w1, b1)),
        "gelu_grad": (
            lambda: column_sum(torch.ops.aten.gelu_backward(dy @ w2, pre)),
            lambda: M.gelu_input_grad(dy, w2, pre),
        ),
        "branch": (branch(M._mlp_torch), branch(M._Mlp.apply)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--rows", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--widths", type=int, nargs="+", default=[192, 128], help="D (fc1 is 4D wide)")
    parser.add_argument("--settings", type=int, default=len(GRID), help="the first this many of the grid")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (--device cpu runs the check under Triton's interpreter)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    # The interpreter multiplies bf16 tiles wrongly (tests/test_train_mlp.py): fp16 there, for a check.
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float16
    shapes = [(m, d) for m in args.rows for d in args.widths]
    calls = {shape: _calls(*shape, args.device, dtype) for shape in shapes}
    lines = [
        f"## The training MLP's products, {device_name(args.device)}, torch {torch.__version__}, {dtype}, us per call"
        f" ({'CUDA graphs' if args.device == 'cuda' else 'the interpreter: not a GPU measure'}), fc1 4D wide",
        "",
        "| kernel | m x D | PyTorch us | Triton us, default | fastest setting | its us | PyTorch / fastest |",
        "|---|---|---:|---:|---|---:|---:|",
    ]

    def time_us(fn: Callable[[], object]) -> float:
        return per_call_us(fn, torch.device(args.device), calls=10 if args.device == "cuda" else 1, reps=20)

    fastest: dict[str, tuple[int, ...]] = {}
    for kernel in ("fc1_gelu", "gelu_grad", "branch"):
        names = [kernel] if kernel in DEFAULTS else list(DEFAULTS)  # the branch runs both kernels' defaults
        per: dict[M.MlpLaunch, dict[tuple[int, int], float]] = {}
        for launch in GRID[: args.settings] if kernel in DEFAULTS else [None]:
            for name in names:
                M.MLP_LAUNCH[name] = launch or DEFAULTS[name]
            try:
                per[launch or DEFAULTS[names[0]]] = {s: time_us(calls[s][kernel][1]) for s in shapes}
            except Exception as err:  # out of shared memory or registers: skipped
                print(f"{kernel} {launch}: {type(err).__name__}", flush=True)
        M.MLP_LAUNCH.update(DEFAULTS)
        torch_us = {s: time_us(calls[s][kernel][0]) for s in shapes}
        best = min(per, key=lambda s: sum(per[s].values()))
        default = per.get(DEFAULTS[names[0]], {})
        for s in shapes:
            lines.append(
                f"| {kernel} | {s[0]} x {s[1]} | {torch_us[s]:.1f} | {default.get(s, float('nan')):.1f} | "
                f"{tuple(best) if kernel in DEFAULTS else 'defaults'} | {per[best][s]:.1f} | "
                f"{torch_us[s] / per[best][s]:.2f}x |"
            )
            print(lines[-1], flush=True)
        if kernel in DEFAULTS:
            fastest[kernel] = tuple(best)
    synchronize(args.device)
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"fastest: { {'MLP_LAUNCH': fastest} }")  # one line for gpu/rows_tune.sh: set in avex.train.mlp
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
