"""Train a TORE classifier: ``avex train classifier`` (one process, or one per GPU under ``torchrun``).

One set of weights has to serve every split point K and every number of glimpses, so every batch
follows TORE's training policy (Token Recycling, arXiv 2311.15335): one K and one glimpse count T per batch, T
random non-overlapping glimpses per image, all through the iterator at once; loss = cross-entropy +
0.1 x MSE of the decoder's reconstruction on the patches no glimpse revealed.

One idea per module:

* :mod:`~avex.train.config` — :class:`TrainConfig`, which is also the command line; dataset defaults.
* :mod:`~avex.train.policy` — the draws of a step: K, T, the glimpses.
* :mod:`~avex.train.objective` — the loss and one optimisation step.
* :mod:`~avex.train.fused` — the same loss in fewer, larger kernels (``--fused-step``), with
  :mod:`~avex.train.kernels` (Triton attention with a backward for short rows) and :mod:`~avex.train.rows`
  (layer norm and bias gradients over many short rows), :mod:`~avex.train.epilogue` (residual adds in the pass
  of the norm after them), :mod:`~avex.train.glimpse_input`, :mod:`~avex.train.decoder_input`,
  :mod:`~avex.train.aggregator_input` and :mod:`~avex.train.recon_loss` (input sequences and loss in single passes) and
  :mod:`~avex.train.flat` (every weight cast in one copy, every gradient in one buffer).
* :mod:`~avex.train.allreduce` — the fused step's gradient average over processes, inside the step.
* :mod:`~avex.train.step` — how a step runs: eager, fused, or captured as CUDA graphs (``--cuda-graphs``).
* :mod:`~avex.train.data` — everything the trainer reads, behind :func:`load_train_data`.
* :mod:`~avex.train.build` — the classifier, its starting weights, AdamW and the LR schedule.
* :mod:`~avex.train.evaluate` — accuracy per K x glimpse count, as a table.
* :mod:`~avex.train.runtime` — processes (``torchrun``), device, autocast.
* :mod:`~avex.train.loop` — :func:`train_classifier`, the run top to bottom, and the entry points.

Usage::

    avex train classifier --dataset fashion-mnist --epochs 140 --batch-size 1024 --lr 2e-3 --label-smoothing 0.1 \\
        --eval-every 20 --out avex/checkpoints/fashion_mnist_tore
    torchrun --standalone --nproc_per_node=8 -m avex.train --dataset imagenet --data-root /data/imagenet ...
    python -m avex.train --steps 200 --batch-size 64 --log-json runs/cpu.jsonl   # a quick benchmark

Shapes: B batch (per rank), Bg global batch, T glimpses, g glimpse side in patches, G = g*g tokens per
glimpse, s = g*patch pixels, N = gh*gw grid patches, C channels.
"""

from avex.train.build import (
    build_classifier,
    init_sincos_pos_embed,
    lr_factor,
    make_optimizer,
    param_groups,
    prepare_classifier,
    start_from_checkpoint,
)
from avex.train.config import TrainConfig, add_arguments, config_from_args, resolve_config
from avex.train.data import TrainData, eval_batches, load_train_data
from avex.train.evaluate import EVAL_GLIMPSES, eval_columns, eval_markdown, evaluate_classifier
from avex.train.fused import FusedObjective
from avex.train.loop import Training, main, main_from_args, start_training, train_classifier
from avex.train.objective import TOREObjective, masked_recon_mse, train_step
from avex.train.policy import cut_glimpses, draw_k_and_t, n_tiles, sample_glimpses, step_rngs
from avex.train.step import GraphedStep, StepPlan, make_step, plan_step

__all__ = [
    "EVAL_GLIMPSES",
    "FusedObjective",
    "GraphedStep",
    "StepPlan",
    "TOREObjective",
    "TrainConfig",
    "TrainData",
    "Training",
    "add_arguments",
    "build_classifier",
    "config_from_args",
    "cut_glimpses",
    "draw_k_and_t",
    "eval_batches",
    "eval_columns",
    "eval_markdown",
    "evaluate_classifier",
    "init_sincos_pos_embed",
    "load_train_data",
    "lr_factor",
    "main",
    "main_from_args",
    "make_optimizer",
    "make_step",
    "masked_recon_mse",
    "n_tiles",
    "param_groups",
    "plan_step",
    "prepare_classifier",
    "resolve_config",
    "sample_glimpses",
    "start_from_checkpoint",
    "start_training",
    "step_rngs",
    "train_classifier",
    "train_step",
]
