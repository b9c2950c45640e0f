"""Training images/s on an ImageNet-layout folder of JPEGs: TORE's step against plain timm training, one loader.

On ``--root``/``--split`` (e.g. the folder of ``benchmarks/make_jpeg_folder.py``), for one timm model (``--model``,
default ``deit3_small_patch16_224``, random weights, 224 px, patch 16), every variant reads its batches from the
trainer's own loader, :class:`avex.train.TrainData` of one :class:`avex.train.TrainConfig` (``--dataset imagenet``:
the same store or decoding, read-ahead threads, flips and seeded draws of each step):

* ``plain``: plain timm training of the same model on the full canvases: ``timm.create_model``, AdamW on avex's
  parameter groups (fused on CUDA), bf16 autocast (``--dtype``), cross-entropy, the trainer's gradient clipping;
  no compile, no graphs;
* ``tore``: avex's TORE step as ``avex train classifier`` runs it (:func:`avex.train.start_training`, then
  ``Training.step``: K, T, glimpses, and the eager, fused or graphed step of its plan). A graphed step captures a
  CUDA graph per (K, T) on first use, so its step indices first run once untimed, then again;
* ``trainer``: :func:`avex.train.train_classifier` itself for ``--warmup + --steps`` steps, ``log_every`` =
  ``--warmup``: its own images/s (after its first interval; graph captures included) and its JSON log.

plain and tore run ``--warmup`` untimed steps, then ``--steps`` timed ones, the same step indices (canvases) for
both. Images/s = batch x steps / the wall time between two device synchronisations.

Loader idle, the part of the step the GPU waits for the loader: :class:`LoaderClock` wraps ``TrainData.next_batch``
and records a CUDA event on the training stream just before the call and one just after it returns. Their elapsed
time is GPU time, from the moment the stream finished the work queued before the call (the previous step) to the
moment it reached the work queued after it (the batch in hand). When the host runs ahead of the GPU, the two
events sit back to back in the queue and the gap is only the loader's own device work (flips, copies); when the
host waits for a read-ahead thread while the queue drains, the gap is the time the GPU idled. No synchronisation
is added inside the timed window (it would stop the host from running ahead), and host timers alone would count
waits during which the GPU is still busy with queued steps. GPU work that the read-ahead threads queue (gathers
from a store on the device, copies) counts in the step time, and in the gap only where it lands between the two
events. Loader idle % = summed gaps / timed wall time. On the CPU, where all is synchronous: host time in the call.

    python benchmarks/train_folder_speed.py --root /tmp/jpeg-imagenet --split train --device cuda --out speed.md
    python benchmarks/train_folder_speed.py --root /tmp/tiny --split train --device cpu --model vit_tiny_patch16_224 \\
        --img-size 128 --batch-size 4 --warmup 1 --steps 2 --out /tmp/tiny.md   # a smoke run

Writes ``--out`` (Markdown) and beside it ``.json``: per variant batch, images/s, ms/step, loader idle %, host ms in
the loader per step, the ratio to plain and the last loss, with the device, the date and the command.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

from avex.platform_info import device_name, synchronize
from avex.train import (
    TrainConfig,
    TrainData,
    load_train_data,
    param_groups,
    resolve_config,
    start_training,
    step_rngs,
    train_classifier,
)
from avex.train.config import need
from avex.train.fused import fused_refusal
from avex.train.runtime import autocast

VARIANTS = ("plain", "tore", "trainer")
Batch = tuple[torch.Tensor, torch.Tensor]  # canvases uint8 [B, H, W, C], labels int64 [B]


class LoaderClock:
    """Times every ``TrainData.next_batch`` call while :meth:`watching` (see the module docstring).

    Attributes:
        calls: per call, (host seconds in the call, CUDA events before and after it, or None off CUDA).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.calls: list[tuple[float, Any, Any]] = []
        self.start = 0  # first call of the timed window

    @contextmanager
    def watching(self) -> Iterator[LoaderClock]:
        """Patch ``TrainData.next_batch`` (the class: the trainer builds its own instance) for the block."""
        original = TrainData.next_batch

        def timed(data: TrainData, step: int, generator: torch.Generator) -> Batch:
            return self._call(original, data, step, generator)

        with mock.patch.object(TrainData, "next_batch", timed):
            yield self

    def _call(self, fn: Callable[..., Batch], data: TrainData, step: int, generator: torch.Generator) -> Batch:
        before = after = None
        if self.cuda:
            before = torch.cuda.Event(enable_timing=True)
            before.record()
        t = time.perf_counter()
        out = fn(data, step, generator)
        host = time.perf_counter() - t
        if self.cuda:
            after = torch.cuda.Event(enable_timing=True)
            after.record()
        self.calls.append((host, before, after))
        return out

    def mark(self) -> None:
        """The timed window starts with the next call."""
        self.start = len(self.calls)

    def window(self, start: int | None = None) -> tuple[float, float, int]:
        """(GPU gap seconds, host seconds, calls) summed over the calls from ``start`` (None: :meth:`mark`'s).

        Reads the events: call it after synchronising the device.
        """
        calls = self.calls[self.start if start is None else start :]
        host = sum(c[0] for c in calls)
        gap = sum(b.elapsed_time(a) / 1e3 for _, b, a in calls) if self.cuda else host
        return gap, host, len(calls)


def timed_steps(
    step_fn: Callable[[int], torch.Tensor], warmup: int, steps: int, device: torch.device, clock: LoaderClock
) -> dict[str, Any]:
    """Run step indices 0..warmup-1 untimed, then warmup..warmup+steps-1 timed; the window's rates.

    Returns:
        dict(seconds, ms_per_step, gap_s, host_s, last_loss).
    """
    for s in range(warmup):
        step_fn(s)
    synchronize(device)
    clock.mark()
    t0 = time.perf_counter()
    loss = torch.zeros(())
    for s in range(warmup, warmup + steps):
        loss = step_fn(s)
    synchronize(device)
    seconds = time.perf_counter() - t0
    gap, host, _ = clock.window()
    return dict(seconds=seconds, ms_per_step=1e3 * seconds / steps, gap_s=gap, host_s=host, last_loss=float(loss))


def plain_model(
    cfg: TrainConfig, num_classes: int, device: torch.device
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``timm.create_model`` at the run's size, random weights; its mean and std as float [1, C, 1, 1]."""
    import timm  # avex's import (above) made timm importable beside a CUDA torchvision

    kwargs: dict[str, Any] = dict(img_size=cfg.img_size, patch_size=cfg.patch, in_chans=cfg.in_chans)
    model = timm.create_model(need(cfg.model, "model"), pretrained=False, num_classes=num_classes, **kwargs)
    model = model.to(device).train()
    timm_cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    grey = (0.5,) * (cfg.in_chans or 3)
    mean, std = cfg.mean or timm_cfg.get("mean", grey), cfg.std or timm_cfg.get("std", grey)
    column = (1, -1, 1, 1)
    return model, torch.tensor(mean, device=device).view(column), torch.tensor(std, device=device).view(column)


def measure_plain(cfg: TrainConfig, args: argparse.Namespace, clock: LoaderClock) -> dict[str, Any]:
    """Plain timm training of ``cfg.model`` on full canvases, fed by the trainer's loader (see the docstring)."""
    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    data = load_train_data(cfg, 0, 1, device)
    model, mean, std = plain_model(cfg, len(data.class_names), device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.lr is not None else 1e-4
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, fused=device.type == "cuda")

    def step(s: int) -> torch.Tensor:
        _, gen = step_rngs(cfg.seed, s, device)
        canvases, labels = data.next_batch(s, gen)
        x = (canvases.permute(0, 3, 1, 2).float() / 255 - mean) / std  # [B, C, H, W]
        with autocast(device, cfg.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        return loss.detach()

    with clock.watching():
        result = timed_steps(step, args.warmup, args.steps, device, clock)
    data.close()
    return dict(variant="plain", label="plain timm, full images", step="eager (timm)", **result)


def measure_tore(cfg: TrainConfig, args: argparse.Namespace, clock: LoaderClock) -> dict[str, Any]:
    """avex's TORE step through ``start_training`` / ``Training.step``, as the trainer runs it."""
    device = torch.device(args.device)
    training = start_training(cfg)
    plan, capture_s = training.run.plan, 0.0
    with clock.watching():
        if plan.graphs:  # capture the graph of every (K, T) the timed steps draw, then time their replays
            t0 = time.perf_counter()
            for s in range(args.warmup + args.steps):
                training.step(s)
            synchronize(device)
            capture_s = time.perf_counter() - t0
        result = timed_steps(lambda s: training.step(s)[3][0], args.warmup, args.steps, device, clock)
    refusal = fused_refusal(training.run.model) if device.type == "cuda" and not plan.fused else None
    training.run.data.close()
    return dict(
        variant="tore",
        label="TORE (Training.step)",
        step=plan.name + (f", {training.graphs} graphs" if plan.graphs else "") + (f" ({refusal})" if refusal else ""),
        graphs=training.graphs,
        capture_pass_s=capture_s,
        **result,
    )


def measure_trainer(cfg: TrainConfig, args: argparse.Namespace, clock: LoaderClock) -> dict[str, Any]:
    """``train_classifier`` for warmup + steps steps: its own images/s (after its first interval) and its log."""
    log = Path(args.out).with_suffix(".trainer.jsonl") if args.out else None
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = replace(
            cfg,
            log_every=args.warmup,
            eval_size=args.batch_size,
            eval_batch_size=args.batch_size,
            out=str(Path(tmp) / "tore"),
            log_json=str(log) if log else None,
        )
        with clock.watching():
            first = len(clock.calls) + args.warmup
            summary = train_classifier(run_cfg)
    img_s = float(summary["images_per_s_per_process"])
    seconds = args.steps * args.batch_size / img_s  # the trainer's timed intervals
    gap, host, _ = clock.window(first)
    rates = sorted({round(json.loads(line)["img_s"]) for line in log.read_text().splitlines()}) if log else []
    return dict(
        variant="trainer",
        label="TORE (avex train classifier run)",
        step=f"{summary.get('step', '?')}"
        + (f", {summary['cuda_graphs']} graphs" if summary.get("cuda_graphs") else ""),
        graphs=summary.get("cuda_graphs", 0),
        seconds=seconds,
        ms_per_step=1e3 * seconds / args.steps,
        gap_s=gap,
        host_s=host,
        last_loss=float(summary["final"].get("loss", float("nan"))),
        interval_img_s=rates,
        log=str(log) if log else None,
    )


MEASURE = {"plain": measure_plain, "tore": measure_tore, "trainer": measure_trainer}


def trainer_command(cfg: TrainConfig, args: argparse.Namespace) -> str:
    """The ``avex train classifier`` command line of the trainer variant's run."""
    flags = [
        f"--dataset {cfg.dataset} --data-root {shlex.quote(args.root)} --train-split {shlex.quote(args.split)}",
        f"--val-split {shlex.quote(args.split)} --model {cfg.model} --img-size {cfg.img_size}",
        f"--batch-size {cfg.batch_size} --steps {args.warmup + args.steps} --log-every {args.warmup}",
        f"--eval-size {cfg.batch_size} --workers {cfg.workers} --device {args.device} --no-progress",
    ]
    return " ".join(["avex train classifier", *flags, *(["--no-amp"] if not cfg.amp else [])])


def config(args: argparse.Namespace) -> TrainConfig:
    """The one config every variant reads its data (and TORE its run) from, resolved."""
    workers = TrainConfig.workers if args.workers is None else args.workers
    return resolve_config(
        TrainConfig(
            dataset=args.dataset,
            data_root=args.root,
            train_split=args.split,
            val_split=args.split,  # no evaluation split: the trainer variant evaluates on a few training images
            workers=workers,
            model=args.model,
            img_size=args.img_size,
            batch_size=args.batch_size,
            steps=args.warmup + args.steps,  # the LR schedule's length (a graphed TORE run's second pass runs at 0)
            amp=args.dtype == "bf16",
            device=args.device,
            progress=False,
        )
    )


def data_path(data: TrainData) -> str:
    """Where ``data``'s batches came from: its store (on the device or the host) or decoding, and the threads.

    Call it after the variants ran: a store is copied to the device on its first read there.
    """
    store = getattr(data.train, "store", None)
    if store is None:
        return f"decoding JPEGs on {data.workers} read-ahead threads (no store)"
    # Read only, for the report: whether the store's rows were copied to the device (ImageStore._on_device).
    on_device = any(t is not None for t in getattr(store, "_device", {}).values())
    placement = "the device" if on_device else "the host (gathered into pinned memory)"
    size = store.images.nbytes / 1e9
    return f"prepared store {store.path} ({len(store)} canvases, {size:.1f} GB) on {placement}; {data.workers} threads"


def finish_row(r: dict[str, Any], batch: int, steps: int) -> dict[str, Any]:
    """Rates of a measured row."""
    r.update(
        batch=batch,
        images_per_s=batch * steps / r["seconds"],
        loader_idle=r["gap_s"] / r["seconds"],
        host_loader_ms=1e3 * r["host_s"] / steps,
    )
    return r


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    plain = next((r for r in rows if r["variant"] == "plain"), None)
    lines = [
        f"## Training on {meta['root']} ({meta['split']}): {meta['model']}, {meta['img_size']} px, random weights, "
        f"{meta['device']}, {meta['dtype']}, {meta['date']}",
        "",
        f"- data: {meta['data']}",
        f"- command: `{meta['command']}`",
        f"- {meta['warmup']} warm-up step(s), then {meta['steps']} timed; loader idle = {meta['idle']} / timed wall "
        "time",
        "",
        "| variant | step | batch | images/s | ms/step | loader idle % | host ms in loader per step | TORE/plain "
        "| last loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['images_per_s'] / plain['images_per_s']:.2f}x" if plain else "-"
        lines.append(
            f"| {r['label']} | {r['step']} | {r['batch']} | {r['images_per_s']:,.0f} | {r['ms_per_step']:.1f} "
            f"| {100 * r['loader_idle']:.1f} | {r['host_loader_ms']:.1f} | {ratio} | {r['last_loss']:.3f} |"
        )
    if any(r["variant"] == "trainer" for r in rows):
        lines += ["", f"The trainer's run is `{meta['trainer_command']}`."]
    lines += [f"- {r['variant']} failed: {r['error']}" for r in meta["failed"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="ImageNet-layout folder (<root>/<split>/<wnid>/*.JPEG)")
    p.add_argument("--split", default="train", help="sub-folder to train on ('' : the root itself)")
    p.add_argument("--dataset", default="imagenet", help="registered data set: imagenet (timm's labels) or folder")
    p.add_argument("--model", default="deit3_small_patch16_224", help="timm model (random weights)")
    p.add_argument("--img-size", type=int, default=None, help="canvas side (default: the data set's, 224)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (the trainer's first interval)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16: autocast / the trainer's --amp")
    p.add_argument("--workers", type=int, default=None, help="read-ahead threads (default: the trainer's)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default=None, help="Markdown report; the JSON goes beside it (.json)")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    return args


def describe(args: argparse.Namespace, cfg: TrainConfig, device: torch.device, argv: list[str]) -> dict[str, Any]:
    """The report's header: device, date, settings and the command (with the store's environment variables)."""
    env = [f"{k}={os.environ[k]}" for k in ("AVEX_STORE_DIR", "AVEX_STORE_ON_DEVICE") if k in os.environ]
    cuda = device.type == "cuda"
    return dict(
        root=args.root,
        split=args.split,
        model=cfg.model,
        img_size=cfg.img_size,
        device=device_name(device),
        dtype="bf16 autocast" if cuda and args.dtype == "bf16" else "fp32",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join([*env, "python", "benchmarks/train_folder_speed.py", *map(shlex.quote, argv)]),
        torch=torch.__version__,
        warmup=args.warmup,
        steps=args.steps,
        trainer_command=trainer_command(cfg, args),
        idle="GPU time between CUDA events around `TrainData.next_batch`"
        if cuda
        else "host time in `TrainData.next_batch` (CPU)",
        failed=[],
    )


def run(args: argparse.Namespace, argv: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every variant in turn (a failing one is reported, the others still run); (rows, meta)."""
    device = torch.device(args.device)
    if device.type == "cuda":  # as the trainer sets them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = config(args)
    meta = describe(args, cfg, device, argv)
    probe = load_train_data(cfg, 0, 1, device)  # keeps the store open across the variants: one copy to the device
    rows = []
    for variant in args.variants:
        try:
            rows.append(finish_row(MEASURE[variant](cfg, args, LoaderClock(device)), args.batch_size, args.steps))
            r = rows[-1]
            print(f"{variant}: {r['images_per_s']:.0f} images/s, loader idle {100 * r['loader_idle']:.1f}%", flush=True)
        except Exception as err:  # report the variants that ran; the failure goes to the report and the log
            meta["failed"].append(dict(variant=variant, error=f"{type(err).__name__}: {err}"))
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta["data"] = data_path(probe)
    probe.close()
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rows, meta = run(args, argv)
    report = markdown(rows, meta)
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
