"""Bias gradients inside the weight-gradient product: a column of ones beside the layer's input, timed.

A linear layer's backward computes ``dW = dy^T x`` (a product over the M rows) and ``db = dy^T 1`` (a column sum
over the same rows, today :func:`avex.train.rows.column_sum`: one pass over dy, then its partials summed). Where x
is stored with a column of ones (and seven zeros, so that each row stays 16-byte aligned) beside its D features,
the one product ``dy^T [x, 1, 0...]`` gives ``[dW, db, 0...]``: dy is read once, by the product. The forward then
reads x through a row stride of D + 8, and the input gradient is written the same way.

This times, per layer shape of the shipped architecture (bf16, CUDA graphs, us per call):

* ``now``: ``F.linear`` forward, ``dy @ W`` and ``dy^T @ x`` (x contiguous [M, D]), and ``column_sum(dy)``;
* ``ones``: the forward over the strided view, ``dy @ W`` into a [M, D + 8] buffer's first D columns, and
  ``dy^T @ [x, 1, 0...]`` [N, D + 8] (the bias gradient its column D);
* ``linear now`` / ``linear ones``: what the step runs, :func:`avex.train.rows.train_linear` forward and backward
  under autograd (``ones=True`` on rows stored beside the column), each gradient then flattened as the step's
  one flat gradient buffer takes it (``ones`` gives the weight gradient transposed, so that is a copy).

    python benchmarks/bias_gemm.py --rows 16384 65536 131072 --out bias_gemm.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's timer
from env_kernels import per_call_us  # noqa: E402

from avex.train.rows import column_sum, train_linear  # noqa: E402

# (layer, out features N, in features D) of the shipped architecture's step (width 192, MLP 768, decoder 128)
SHAPES = [
    ("qkv", 576, 192),
    ("fc1", 768, 192),
    ("patch embed", 192, 64),
    ("decoder qkv", 384, 128),
    ("decoder fc1", 512, 128),
    ("decoder embed", 128, 192),
    ("decoder pred", 64, 128),
]
PAD = 8


def _time(fn: Callable[[], object]) -> float:
    """Median us per call of ``fn``, replayed in a CUDA graph of 20 calls (env_kernels.py's timer)."""
    return per_call_us(fn, torch.device("cuda"), calls=20, reps=5)


def measure(m: int, n: int, d: int) -> dict[str, float]:
    dev, dt_ = "cuda", torch.bfloat16
    x = torch.randn(m, d, device=dev, dtype=dt_)
    xp = torch.zeros(m, d + PAD, device=dev, dtype=dt_)
    xp[:, :d] = x
    xp[:, d] = 1
    w = torch.randn(n, d, device=dev, dtype=dt_) * d**-0.5
    b = torch.randn(n, device=dev, dtype=dt_)
    dy = torch.randn(m, n, device=dev, dtype=dt_)
    dxp = torch.empty(m, d + PAD, device=dev, dtype=dt_)
    # The results agree (bf16 products with fp32 accumulation both ways; the bias sum in fp32 both ways).
    dwp = dy.t() @ xp
    ref_db, ref_dw = column_sum(dy).float(), (dy.t() @ x).float()
    err_db = ((dwp[:, d].float() - ref_db).abs().max() / ref_db.abs().max()).item()
    err_dw = ((dwp[:, :d].float() - ref_dw).abs().max() / ref_dw.abs().max()).item()
    fwd_ok = torch.equal(F.linear(x, w, b), torch.addmm(b, xp[:, :d], w.t()))
    xv = xp[:, :d]  # the rows as the norm stores them with ones=True
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    leaves_ones = [xv.detach().requires_grad_(), *(t.clone().requires_grad_() for t in (w, b))]

    def linear(inputs: list[torch.Tensor], ones: bool) -> list[torch.Tensor]:
        grads = torch.autograd.grad(train_linear(*inputs, ones=ones), inputs, dy)
        return [g.reshape(-1) for g in grads]

    r = {
        "linear now": _time(lambda: linear(leaves, False)),
        "linear ones": _time(lambda: linear(leaves_ones, True)),
        "fwd now": _time(lambda: F.linear(x, w, b)),
        "fwd ones": _time(lambda: torch.addmm(b, xp[:, :d], w.t())),
        "dx now": _time(lambda: dy @ w),
        "dx ones": _time(lambda: torch.mm(dy, w, out=dxp[:, :d])),
        "dw now": _time(lambda: dy.t() @ x),
        "db now": _time(lambda: column_sum(dy)),
        "dw+db ones": _time(lambda: dy.t() @ xp),
    }
    r["now"] = r["fwd now"] + r["dx now"] + r["dw now"] + r["db now"]
    r["ones"] = r["fwd ones"] + r["dx ones"] + r["dw+db ones"]
    r.update(err_db=err_db, err_dw=err_dw, fwd_equal=float(fwd_ok))
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[16384, 65536, 131072])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cols = ["fwd now", "fwd ones", "dx now", "dx ones", "dw now", "db now", "dw+db ones", "now", "ones"]
    cols += ["linear now", "linear ones"]
    lines = [
        f"## Bias gradient inside the weight-gradient product, {torch.cuda.get_device_name()}, torch "
        f"{torch.__version__}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "`python benchmarks/bias_gemm.py --rows " + " ".join(map(str, args.rows)) + "`: us per call, bf16, CUDA "
        "graphs; `now`: forward + dx + dW + column_sum; `ones`: the same with x stored beside a ones column.",
        "",
        "| layer | M | N | D | " + " | ".join(cols) + " | ones / now | linear ones / now | db rel err | dW rel err | "
        "fwd equal |",
        "|---|---:|---:|---:|" + "---:|" * (len(cols) + 5),
    ]
    total = dict.fromkeys(("now", "ones", "linear now", "linear ones"), 0.0)
    for m in args.rows:
        for name, n, d in SHAPES:
            r = measure(m, n, d)
            total = {k: v + r[k] for k, v in total.items()}
            row = " | ".join(f"{r[c]:.1f}" for c in cols)
            lines.append(
                f"| {name} | {m} | {n} | {d} | {row} | {r['ones'] / r['now']:.3f} | "
                f"{r['linear ones'] / r['linear now']:.3f} | {r['err_db']:.1e} | {r['err_dw']:.1e} | "
                f"{int(r['fwd_equal'])} |"
            )
            print(lines[-1], flush=True)
    lines += ["", f"Summed over the shapes: now {total['now']:.1f} us, ones {total['ones']:.1f} us "
              f"({total['ones'] / total['now']:.3f}); train_linear {total['linear now']:.1f} us, with ones=True "
              f"{total['linear ones']:.1f} us ({total['linear ones'] / total['linear now']:.3f})."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
