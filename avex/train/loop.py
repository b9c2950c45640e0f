"""Train a TORE classifier: ``avex train classifier`` (one process, or one per GPU under ``torchrun``).

:func:`train_classifier` reads top to bottom: set up the processes, data and model; run the steps of
TORE's policy (:mod:`~avex.train.policy`), logging once per interval and evaluating or saving every so
many epochs; then evaluate on the whole evaluation set and save the checkpoint (rank 0).

Every random draw of a step (canvases, K, T, glimpses, flips) comes from generators seeded by
(seed, step) and is made for the GLOBAL batch on every rank; each rank keeps its slice. With DDP's
gradient averaging of per-rank mean losses (DDP's wrapper for the eager step; for the fused step, one
all-reduce of its flat gradient buffer inside the step, :mod:`avex.train.allreduce`), N processes then
train the same weights as one process on the same global batch.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from avex.checkpoint import save_tore
from avex.checks import check_device, check_writable
from avex.geometry import GlimpseGeometry
from avex.model import TOREViT
from avex.platform_info import device_name, synchronize
from avex.train.allreduce import average_gradients, broadcast_state
from avex.train.build import check_buildable, lr_factor, make_optimizer, prepare_classifier, warmup_steps
from avex.train.config import TrainConfig, add_arguments, config_from_args, need, resolve_config
from avex.train.data import TrainData, load_train_data
from avex.train.evaluate import eval_columns, eval_markdown, eval_summary, evaluate_classifier
from avex.train.fused import FusedObjective
from avex.train.objective import TOREObjective
from avex.train.policy import draw_continuous, draw_k_and_t, n_tiles, sample_continuous, sample_glimpses, step_rngs
from avex.train.runtime import setup_distributed, teardown_distributed
from avex.train.step import GraphedStep, Step, StepPlan, make_step, plan_step

__all__ = ["Training", "main", "main_from_args", "start_training", "train_classifier"]


@dataclass
class _Run:
    """What the parts of a run share: the resolved config, this process, the data and the model."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    data: TrainData
    model: TOREViT
    geo: GlimpseGeometry
    tiles: int  # non-overlapping glimpses that fit the grid: the largest T
    init_meta: dict[str, Any] | None  # the --init checkpoint's meta
    steps_per_epoch: int
    total_steps: int
    plan: StepPlan  # eager, fused or graphed (avex.train.step)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.world

    @property
    def budget(self) -> int:
        """Glimpses per episode (resolved from the data set when the config leaves it None)."""
        return need(self.cfg.budget, "budget")

    @property
    def part(self) -> slice:
        """This rank's rows of a global batch."""
        return slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)

    def every(self, epochs: float) -> int:
        """Steps between events ``epochs`` apart (0: never)."""
        return max(1, round(epochs * self.steps_per_epoch)) if epochs and epochs > 0 else 0

    def lr(self, step: int) -> float:
        """The learning rate of ``step`` (as the scheduler sets it), computed on the host."""
        return need(self.cfg.lr, "lr") * lr_factor(step, self.total_steps, warmup_steps(self.cfg, self.total_steps))


@dataclass
class Training:
    """A run ready to step (:func:`start_training`): its processes, data, model, optimiser and step function."""

    run: _Run
    step_fn: Step
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def step(self, step: int) -> tuple[int, int, float, torch.Tensor]:
        """Training step ``step`` (its draws come from (seed, step)); returns (K, T, lr, float [4] loss, ce, mse,
        accuracy on this rank, on the device)."""
        return _train_one_step(self.run, self.step_fn, self.scheduler, step)

    @property
    def graphs(self) -> int:
        """CUDA graphs captured so far (0 unless the step is graphed)."""
        return len(self.step_fn.graphs) if isinstance(self.step_fn, GraphedStep) else 0


def start_training(cfg: TrainConfig) -> Training:
    """Set up a run of ``cfg`` (resolved here): processes, data, model, objective, optimiser and step function."""
    run = _set_up(resolve_config(cfg))
    cfg, model = run.cfg, run.model
    objective: nn.Module
    if run.plan.fused:
        dtype = run.plan.compute_dtype(run.device, cfg.amp)
        reduce = average_gradients if run.world > 1 else None
        objective = FusedObjective(model, run.geo, cfg.recon_weight, cfg.label_smoothing, dtype, reduce)
    else:
        objective = TOREObjective(model, run.geo, cfg.recon_weight, cfg.label_smoothing, cfg.distill, cfg.distill_temp)
    if run.world > 1 and run.plan.fused:  # the gradients averaged inside the step (graphs can hold it)
        broadcast_state(objective)  # DDP's start: rank 0's weights
    elif run.world > 1:
        device_ids = [run.device] if run.device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=device_ids)
    optimizer, scheduler = make_optimizer(model, cfg, run.total_steps, run.device, capturable=run.plan.graphs)
    step_fn = make_step(run.plan, objective, model, optimizer, cfg.amp, cfg.grad_clip)
    return Training(run, step_fn, scheduler)


def train_classifier(cfg: TrainConfig) -> dict[str, Any]:
    """Train a TORE classifier, evaluate it and save it (rank 0).

    Returns:
        dict(model, steps, train_time_s, images_per_s_per_process, final (the last interval's mean loss, ce,
        mse, acc), rank, world_size); on rank 0 also checkpoint, eval, eval_markdown, checkpoint_mib.
    """
    training = start_training(cfg)
    run = training.run
    cfg, model = run.cfg, run.model
    eval_every, save_every = run.every(cfg.eval_every), run.every(cfg.save_every)
    if run.main:
        _announce(run)
    meter = _Meter(run)
    for step in range(run.total_steps):
        meter.add(step, *training.step(step))
        done = step + 1
        last = done == run.total_steps
        if done % cfg.log_every == 0 or last:
            meter.end_interval(done)
        if run.main and eval_every and done % eval_every == 0 and not last:
            meter.write(f"step {done}: " + eval_summary(_evaluate(run, cfg.eval_subset), run.budget))
        if run.main and save_every and done % save_every == 0 and not last:
            _save(run, None, time.perf_counter() - meter.t_start, done)
    train_time, img_s = meter.finish()
    run.data.close()
    summary: dict[str, Any] = dict(
        model=model,
        steps=run.total_steps,
        train_time_s=train_time,
        images_per_s_per_process=img_s,
        final=meter.recent,
        rank=run.rank,
        world_size=run.world,
        step=run.plan.name,
        cuda_graphs=training.graphs,
    )
    if run.main:
        summary.update(_final_evaluation(run, train_time, img_s, meter.recent))
    world = run.world
    del training, run, meter  # the DDP in the step goes while the group is up (teardown_distributed says why)
    teardown_distributed(world)
    return summary


def _set_up(cfg: TrainConfig) -> _Run:
    """Join the processes, seed, load the data, build the model and check the policy's limits against it."""
    # Before the processes join or the data are read: the device (torch.device("gpu") raised a RuntimeError), the
    # model (on the meta device) and where the run writes, which failed only when a file was written, after training.
    if cfg.device is not None:
        check_device("--device", cfg.device)
    check_buildable(cfg)
    weights = Path(cfg.out).with_suffix(".safetensors")
    for path in (weights, weights.with_suffix(".json")):
        check_writable("--out", path)
    if cfg.log_json:
        check_writable("--log-json", cfg.log_json)
    rank, world, device = setup_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # The model init, the same on every rank (DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    data = load_train_data(cfg, rank, world, device)
    model, init_meta = prepare_classifier(cfg, len(data.class_names), device)
    geo = model.geometry(need(cfg.glimpse, "glimpse"), stride=1)
    tiles = n_tiles(geo)
    if cfg.train_k is not None and (not cfg.train_k or not all(0 <= k <= model.depth for k in cfg.train_k)):
        raise ValueError(
            f"--train-k {list(cfg.train_k)}: every split point must be in 0..{model.depth} (the model's depth)"
        )
    if cfg.train_t is not None and (not cfg.train_t or not all(1 <= t <= tiles for t in cfg.train_t)):
        raise ValueError(
            f"--train-t {list(cfg.train_t)}: every glimpse count must be in 1..{tiles} "
            f"(non-overlapping {cfg.glimpse}x{cfg.glimpse} glimpses of the {geo.grid} grid)"
        )
    if not 1 <= need(cfg.budget, "budget") <= tiles:
        raise ValueError(
            f"--budget {cfg.budget} must be in 1..{tiles} "
            f"(non-overlapping {cfg.glimpse}x{cfg.glimpse} glimpses of the {geo.grid} grid)"
        )
    plan = plan_step(cfg, model, device, world)
    steps_per_epoch = max(1, data.num_train // cfg.batch_size)
    total_steps = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    return _Run(cfg, rank, world, device, data, model, geo, tiles, init_meta, steps_per_epoch, total_steps, plan)


def _announce(run: _Run) -> None:
    """One line: the data, the model, the geometry, the processes and the length of the run."""
    cfg, model = run.cfg, run.model
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[avex.train] {cfg.dataset}: {run.data.num_train} training images, {len(run.data.class_names)} classes; "
        f"{cfg.model} depth {model.depth} width {model.embed_dim}, {n_params / 1e6:.2f} M parameters; "
        f"grid {run.geo.grid}, glimpse {cfg.glimpse}, budget {cfg.budget}, {run.tiles} tiles; "
        f"{run.world} process(es) on {device_name(run.device)}; global batch {cfg.batch_size}, "
        f"{run.total_steps} steps ({run.total_steps / run.steps_per_epoch:.1f} epochs), {run.plan.name} step",
        flush=True,
    )
    if run.plan.note:
        print(f"[avex.train] {run.plan.note}", flush=True)


def _train_one_step(
    run: _Run, step_fn: Step, scheduler: torch.optim.lr_scheduler.LRScheduler, step: int
) -> tuple[int, int, float, torch.Tensor]:
    """One step of TORE's policy: K, T, this rank's batch and its glimpses from (seed, step); train; advance the LR.

    Returns:
        (K, T, the learning rate of the step, float [4] loss, ce, mse, accuracy on this rank, on the device).
    """
    cfg, part = run.cfg, run.part
    host_rng, gen = step_rngs(cfg.seed, step, run.device)
    K, T = draw_k_and_t(host_rng, run.model.depth, run.budget, run.tiles, cfg.train_k, cfg.train_t)
    continuous = draw_continuous(host_rng, cfg.continuous_glimpses)
    canvases, labels = run.data.next_batch(step, gen)
    rows, cols = sample_glimpses(run.geo, cfg.batch_size, T, gen)  # for the global batch, after its canvases
    batch: tuple[torch.Tensor, ...] = (canvases, labels, rows[part], cols[part])
    if continuous:  # drawn last, so the grid glimpses stay those of a run without the option
        batch += (sample_continuous(cfg.batch_size, T, gen)[part],)
    stats = step_fn(batch, K)
    lr = run.lr(step)  # the host's copy: a graphed step's learning rate is a tensor on the device
    scheduler.step()
    return K, T, lr, stats


class _Meter:
    """Training statistics: kept on the device every step, averaged over ranks and written once per interval.

    Each interval costs one GPU sync. The first interval includes the warm-up (allocations, autotuning),
    so the throughput leaves it out when there is a later one.
    """

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.pending: list[tuple[int, int, int, float, torch.Tensor]] = []  # (step, K, T, lr, [loss, ce, mse, acc])
        self.recent: dict[str, float] = {}  # the last interval's means
        self.timed_images, self.timed_seconds, self.images_since = 0, 0.0, 0
        self.log_file: TextIO | None = None
        if run.main and run.cfg.log_json:
            Path(run.cfg.log_json).parent.mkdir(parents=True, exist_ok=True)
            self.log_file = open(run.cfg.log_json, "w")
        show = run.main and run.cfg.progress
        self.bar = tqdm(total=run.total_steps, disable=not show, dynamic_ncols=True, desc="train")
        self.t_start = self.t_mark = time.perf_counter()

    def add(self, step: int, K: int, T: int, lr: float, stats: torch.Tensor) -> None:
        self.pending.append((step, K, T, lr, stats))
        self.images_since += self.run.local_batch
        self.bar.update(1)

    def end_interval(self, done: int) -> None:
        """After ``done`` steps: average the interval's statistics over ranks; update the progress bar and the log."""
        stats = torch.stack([p[-1] for p in self.pending])  # [n, 4]
        if self.run.world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            stats /= self.run.world
        values = stats.tolist()  # the one GPU sync of the interval
        now = time.perf_counter()
        rate = self.images_since / (now - self.t_mark)  # images/s per process
        if done > self.run.cfg.log_every:
            self.timed_images += self.images_since
            self.timed_seconds += now - self.t_mark
        self.t_mark, self.images_since = now, 0
        mean = np.mean(values, axis=0)
        self.recent = dict(loss=float(mean[0]), ce=float(mean[1]), mse=float(mean[2]), acc=float(mean[3]))
        self.bar.set_postfix(loss=f"{mean[0]:.3f}", acc=f"{100 * mean[3]:.1f}", img_s=f"{rate:.0f}", refresh=False)
        if self.log_file is not None:
            for (s, k, t, lr, _), v in zip(self.pending, values):
                record = dict(step=s, K=k, T=t, lr=lr, loss=v[0], ce=v[1], mse=v[2], acc=v[3], img_s=rate)
                self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()
        self.pending.clear()

    def write(self, text: str) -> None:
        """A line above the progress bar."""
        self.bar.write(text)

    def finish(self) -> tuple[float, float]:
        """Wait for the device, close the bar and the log. Returns (training seconds, images/s per process)."""
        synchronize(self.run.device)
        train_time = time.perf_counter() - self.t_start
        self.bar.close()
        if self.log_file is not None:
            self.log_file.close()
        if self.timed_seconds:
            return train_time, self.timed_images / self.timed_seconds
        return train_time, self.run.total_steps * self.run.local_batch / train_time


def _evaluate(run: _Run, limit: int) -> dict[str, Any]:
    """The accuracy table on ``limit`` evaluation images (0: all) at the model's report K's, with a progress bar."""
    cfg = run.cfg
    source = run.data.eval_source
    n = len(source) if source is not None and (limit <= 0 or limit > len(source)) else limit
    batches = tqdm(
        run.data.eval_batches(cfg.eval_batch_size, limit),
        total=math.ceil(n / cfg.eval_batch_size),
        desc=f"evaluate {n} images",
        disable=not cfg.progress,
        leave=False,
    )
    columns = eval_columns(run.budget, run.geo)
    return evaluate_classifier(run.model, batches, run.geo, run.model.report_ks, columns, cfg.amp)


def _save(run: _Run, eval_table: dict[str, Any] | None, train_time: float, steps: int) -> Path:
    """The checkpoint with the run's recipe, results and provenance (``init_from``: the run it continued)."""
    cfg = run.cfg
    meta: dict[str, Any] = dict(
        dataset=cfg.dataset,
        class_names=run.data.class_names,
        image_size=cfg.img_size,
        patch=cfg.patch,
        glimpse=cfg.glimpse,
        budget=cfg.budget,
        options=run.data.options,
        train_args={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        eval=eval_table,
        train_time_s=round(train_time, 1),
        steps=steps,
        world_size=run.world,
        device=device_name(run.device),
        torch=torch.__version__,
    )
    if run.init_meta is not None:  # recursively: its recipe, time and results, and where it started
        keep = ("train_args", "train_time_s", "steps", "device", "eval", "init_from")
        meta["init_from"] = {k: run.init_meta[k] for k in keep if k in run.init_meta}
    return save_tore(run.model, cfg.out, meta=meta, half=cfg.half)


def _final_evaluation(run: _Run, train_time: float, img_s: float, recent: dict[str, float]) -> dict[str, Any]:
    """Evaluate on the whole evaluation set (or ``eval_size`` images), print, save the checkpoint and the tables.

    A run shorter than an epoch is a trial: it evaluates ``eval_subset`` images unless ``eval_size`` is given.
    """
    cfg = run.cfg
    size = cfg.eval_size if cfg.eval_size or run.total_steps >= run.steps_per_epoch else cfg.eval_subset
    table = _evaluate(run, size)
    md = eval_markdown(table)
    print(
        f"[avex.train] {run.total_steps} steps in {train_time:.1f} s, {img_s:.0f} images/s per process; last loss "
        f"{recent.get('loss', float('nan')):.4f}, train acc {100 * recent.get('acc', float('nan')):.1f}%\n{md}",
        flush=True,
    )
    path = _save(run, table, train_time, run.total_steps)
    stem = path.with_suffix("")
    Path(f"{stem}.eval.md").write_text(md + "\n")
    Path(f"{stem}.eval.json").write_text(json.dumps(table, indent=2) + "\n")
    size_mb = path.stat().st_size / 2**20
    print(f"[avex.train] saved {path} ({size_mb:.1f} MiB) and {stem}.eval.md/.json", flush=True)
    return dict(checkpoint=str(path), eval=table, eval_markdown=md, checkpoint_mib=size_mb)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main_from_args(args: argparse.Namespace) -> int:
    """Entry point for an argparse sub-command whose parser went through :func:`add_arguments`."""
    train_classifier(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m avex.train`` / ``torchrun -m avex.train``: the flags of ``avex train classifier``."""
    parser = argparse.ArgumentParser(
        prog="avex train classifier",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return main_from_args(add_arguments(parser).parse_args(argv))
