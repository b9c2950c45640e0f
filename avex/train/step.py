"""How a training step runs: eager, fused, or the whole fused step captured as CUDA graphs (``--cuda-graphs``).

A step is (this rank's batch, K) -> float [4] (loss, ce, mse, accuracy) on the device, after one optimiser
update. Three ways, one interface (:func:`make_step`):

* **eager** — :func:`~avex.train.objective.train_step` on :class:`~avex.train.objective.TOREObjective`
  under autocast: one kernel launch per PyTorch op, about 930 a step, each paid for by the host;
* **fused** — the same step on :class:`~avex.train.fused.FusedObjective` (fewer, larger kernels, one
  compute dtype); with several processes, its backward averages every gradient over them in one flat
  buffer (:mod:`avex.train.allreduce`) instead of DDP's wrapper;
* **graphed** — the fused step, backward (with that average: one ``all_reduce`` under DDP), gradient
  clipping and the fused AdamW update captured once per (K, T) as a CUDA graph (:class:`GraphedStep`) and
  replayed: the host copies the batch into the graph's input buffers and launches one graph. The batch
  itself is drawn on the device before (canvases, labels, glimpses: :mod:`avex.train.policy`,
  :meth:`~avex.data.CanvasSource.random_batch`).

``auto`` (both options' default) picks the graphed step on CUDA, for one process and under DDP alike (there the
all-reduce inside each graph; measured on 2 H200s, RESULTS.md section 7.1), and the eager step on the CPU,
where the fused and graphed options fall back to it (same numbers as ``off``); ``--cuda-graphs off`` keeps the
fused step without graphs.
The fused step computes neither self-distillation (``--distill``) nor continuous glimpses
(``--continuous-glimpses``): with either, ``auto`` runs the eager step (the plan's ``note`` says why, and the
run prints it) and ``on`` is refused (:func:`option_refusal`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from avex.model import TOREViT
from avex.train.config import TrainConfig
from avex.train.fused import fused_refusal
from avex.train.objective import train_step

__all__ = ["GraphedStep", "StepPlan", "init_optimizer_state", "make_step", "option_refusal", "plan_step"]

# canvases, labels, rows, cols; the eager step also takes continuous glimpses' yxz [B, T, 3] after them
Batch = tuple[torch.Tensor, ...]
Step = Callable[[Batch, int], torch.Tensor]  # (batch, K) -> float [4] loss, ce, mse, accuracy


class StepPlan(NamedTuple):
    """How this run's steps run (see the module doc)."""

    fused: bool
    graphs: bool
    note: str = ""  # why ``auto`` did not take the fused step it would otherwise take ("": nothing to say)

    @property
    def name(self) -> str:
        return "graphed" if self.graphs else "fused" if self.fused else "eager"

    def compute_dtype(self, device: torch.device, amp: bool) -> torch.dtype:
        """The fused step's dtype: bf16 on CUDA under ``amp`` (as autocast's matrix products), else fp32."""
        return torch.bfloat16 if device.type == "cuda" and amp else torch.float32


def plan_step(cfg: TrainConfig, model: TOREViT, device: torch.device, world: int = 1) -> StepPlan:
    """Resolve ``--fused-step`` and ``--cuda-graphs`` for this run of ``world`` processes.

    ``world`` (the processes) does not change the choice: under DDP the graphs hold the gradients' all-reduce.

    Raises:
        ValueError: ``on`` where it cannot run (naming why and what to pass instead).
    """
    for name in ("fused_step", "cuda_graphs"):
        if getattr(cfg, name) not in ("auto", "on", "off"):
            raise ValueError(f"--{name.replace('_', '-')} must be auto, on or off, got {getattr(cfg, name)!r}")
    model_refusal, options = fused_refusal(model), option_refusal(cfg)
    refusal = options or model_refusal
    if cfg.fused_step == "on" and refusal:
        raise ValueError(f"--fused-step on: {refusal}; use --fused-step {'auto or off' if options else 'off'}")
    if cfg.cuda_graphs == "on":
        why = (
            "they need a CUDA device"
            if device.type != "cuda"
            else "they capture the fused step, which is off"
            if cfg.fused_step == "off"
            else refusal
        )
        if why:
            raise ValueError(f"--cuda-graphs on: {why}; use --cuda-graphs auto or off")
    cuda = device.type == "cuda"
    # --compile compiles the eager step's blocks: auto then keeps the eager step.
    fused = cfg.fused_step == "on" or (cfg.fused_step == "auto" and cuda and not refusal and not cfg.compile)
    graphs = fused and cuda and cfg.cuda_graphs in ("on", "auto")
    # Say so where only the options kept auto from the fused step.
    would_fuse = cfg.fused_step == "auto" and cuda and not model_refusal and not cfg.compile
    note = f"the eager step: {options}" if options and would_fuse else ""
    return StepPlan(fused, graphs, note)


def option_refusal(cfg: TrainConfig) -> str | None:
    """Why the fused step cannot run ``cfg``'s objective (the options it does not compute), or None."""
    on = [
        f"--{flag} {value:g}"
        for flag, value in (("distill", cfg.distill), ("continuous-glimpses", cfg.continuous_glimpses))
        if value
    ]
    if not on:
        return None
    return f"{' and '.join(on)} {'is' if len(on) == 1 else 'are'} computed by the eager step only"


def eager_step(
    objective: nn.Module, model: TOREViT, optimizer: torch.optim.Optimizer, amp: bool, grad_clip: float
) -> Step:
    """:func:`~avex.train.objective.train_step` (``amp``: under bf16 autocast), with the batch's accuracy."""

    def step(batch: Batch, K: int) -> torch.Tensor:
        loss, ce, mse, logits = train_step(objective, model, optimizer, batch, K, amp, grad_clip)
        acc = (logits.argmax(-1) == batch[1]).float().mean()
        return torch.stack([loss.detach().float(), ce.float(), mse.float(), acc])

    return step


def make_step(
    plan: StepPlan, objective: nn.Module, model: TOREViT, optimizer: torch.optim.Optimizer, amp: bool, grad_clip: float
) -> Step:
    """The step function of a plan (``objective``: a FusedObjective, or DDP around one, where the plan is fused).

    The graphed step needs an optimiser built with ``capturable=True`` (:func:`~avex.train.build.make_optimizer`).
    """
    if plan.graphs:
        return GraphedStep(objective, model, optimizer, grad_clip)
    # The fused objective manages its dtypes itself: autocast would put its layer norms back in fp32.
    return eager_step(objective, model, optimizer, amp and not plan.fused, grad_clip)


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], grad_clip: float) -> None:
    """Create the optimiser's state (outside any graph) without changing the weights or the state's values.

    One update with zero gradients creates the moments and step counts where PyTorch allocates them; the
    weights (which weight decay moved) and the state (which the update advanced) are then put back to their
    starting values. It also runs the clipping and update kernels once, so that none loads during a capture.
    """
    if optimizer.state:
        return
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    for p, s in zip(params, saved):
        p.copy_(s)
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()
    optimizer.zero_grad(set_to_none=True)


class GraphedStep:
    """The fused step, its backward, clipping and optimiser update as CUDA graphs, one per (K, T).

    A new (K, T) is warmed up (forward and backward on a side stream: kernels load, Triton compiles) and
    captured on first use, then replayed; all graphs share one memory pool (they never run at the same time).
    The warm-up changes no weight: the first update of every graph is its first replay. Inputs are copied
    into static buffers (canvases and labels for all graphs, glimpses per T); the statistics are cloned out.

    Under DDP every rank captures and replays the same graphs in the same order (a step's (K, T) is drawn for
    the global batch), each holding the objective's gradient average (one NCCL ``all_reduce``), which the
    warm-up also runs once, eagerly, before the capture.

    Args:
        objective: a :class:`~avex.train.fused.FusedObjective` (with ``grad_reduce`` under DDP, no wrapper).
        optimizer: AdamW with ``capturable=True`` and a tensor learning rate (its scheduler updates the tensor).
    """

    def __init__(
        self, objective: nn.Module, model: TOREViT, optimizer: torch.optim.Optimizer, grad_clip: float
    ) -> None:
        self.objective, self.model, self.optimizer, self.grad_clip = objective, model, optimizer, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()  # warm-ups and captures: the stream's cuBLAS workspace exists before
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._shared: dict[str, torch.Tensor] = {}  # canvases, labels
        self._glimpses: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # T -> rows, cols
        self.capture_seconds = 0.0  # spent warming up and capturing

    def __call__(self, batch: Batch, K: int) -> torch.Tensor:
        canvases, labels, rows, cols = batch
        static = self._static(canvases, labels, rows, cols)
        for dst, src in zip(static, batch):
            dst.copy_(src)
        key = (int(K), rows.shape[1])
        if key not in self.graphs:
            self.graphs[key] = self._capture(static, key[0])
        graph, stats = self.graphs[key]
        graph.replay()
        return stats.clone()

    def _static(self, canvases: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> Batch:
        shared = self._shared
        if "canvases" not in shared or shared["canvases"].shape != canvases.shape:
            shared["canvases"], shared["labels"] = torch.empty_like(canvases), torch.empty_like(labels)
            self.graphs.clear()  # captured on the old buffers
        t = rows.shape[1]
        if t not in self._glimpses:
            self._glimpses[t] = (torch.empty_like(rows), torch.empty_like(cols))
        return (shared["canvases"], shared["labels"], *self._glimpses[t])

    def _body(self, static: Batch, K: int) -> torch.Tensor:
        """What a graph holds: forward, backward, clipping, update; the statistics as float [4]."""
        loss, ce, mse, logits = self.objective(*static, K)
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        acc = (logits.argmax(-1) == static[1]).float().mean()
        return torch.stack([loss.detach().float(), ce.float(), mse.float(), acc])

    def _capture(self, static: Batch, K: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        start = time.perf_counter()
        init_optimizer_state(self.optimizer, self.params, self.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # warm-up: no update, the gradients are dropped
            self.objective(*static, K)[0].backward()
        torch.cuda.current_stream().wait_stream(self.stream)
        # Gradients allocated inside the capture live in the graph's pool: each replay writes them in place.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            stats = self._body(static, K)
        self.capture_seconds += time.perf_counter() - start
        return graph, stats
