"""Train a TORE classifier: ``avex train classifier`` (one process, or one per GPU under ``torchrun``).

One set of weights has to serve every split point K and every number of glimpses, so each batch
follows TORE's training policy (see ``tore-method.md``):

1. one K drawn uniformly from 0..depth for the whole batch;
2. one glimpse count T for the whole batch: with probability 1/2 uniform in 1..budget, otherwise
   uniform in budget..n_tiles (n_tiles: the non-overlapping tiles that cover the grid, so T=n_tiles
   with shift 0 reveals every patch);
3. per image, T random NON-overlapping g x g glimpses: a random shift (dy, dx) in {0..g-1}^2, then T
   distinct positions of the shifted stride-g lattice that fit in the grid;
4. all T glimpses through the iterator at once (``TOREViT.forward_glimpses``); loss = cross-entropy
   + 0.1 x MSE of the decoder's reconstruction on the patches no glimpse revealed.

Every random draw of a step (canvases, K, T, glimpses, flips) comes from generators seeded by
(seed, step) and is made for the GLOBAL batch on every rank; each rank keeps its slice. With DDP's
gradient averaging of per-rank mean losses, N processes then train the same weights as one process
on the same global batch.

Usage::

    avex train classifier --dataset fashion-mnist --epochs 140 --batch-size 1024 --lr 2e-3 --label-smoothing 0.1 \
        --eval-every 20 --out avex/checkpoints/fashion_mnist_tore        # ~8 min on one H100
    torchrun --standalone --nproc_per_node=8 -m avex.train --dataset imagenet --data-root /data/imagenet ...
    python -m avex.train --steps 200 --batch-size 64 --log-json runs/cpu.jsonl   # quick benchmark

Shapes: B batch (per rank), Bg global batch, T glimpses, g glimpse side in patches, G = g*g tokens per
glimpse, s = g*patch pixels, N = gh*gw grid patches, C channels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from avex.checkpoint import load_state, load_tore, save_tore
from avex.geometry import GlimpseGeometry
from avex.model import TOREViT, create_tore
from avex.platform_info import device_name, synchronize
from avex.posembed import grid_coords, sincos_2d

__all__ = [
    "DATASET_DEFAULTS",
    "TOREObjective",
    "TrainConfig",
    "add_arguments",
    "build_model",
    "config_from_args",
    "cut_glimpses",
    "draw_k_and_t",
    "eval_markdown",
    "evaluate",
    "fashion_mnist_canvases",
    "init_sincos_pos_embed",
    "masked_recon_mse",
    "main",
    "main_from_args",
    "resolve_config",
    "sample_glimpses",
    "start_from_checkpoint",
    "step_rngs",
    "train_classifier",
    "train_step",
]

# Model defaults per dataset; every one can be overridden from the command line.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The embedded default (AVE-FashionMNIST-v0): a 6-block ViT-Tiny on 112x112 canvases, 8 px patches.
    "fashion-mnist": dict(
        model="vit_tiny_patch16_224",
        img_size=112,
        patch=8,
        in_chans=1,
        depth=6,
        embed_dim=192,
        num_heads=3,
        mean=(0.1,),
        std=(0.25,),
        lr=1e-3,
    ),
    # ImageNet-1k (timm's label order); DeiT-III-S as in TORE's ImageNet runs, fine-tuned.
    "imagenet": dict(model="deit3_small_patch16_224", img_size=224, patch=16, in_chans=3, lr=1e-4),
    # Any folder of class subfolders.
    "folder": dict(model="vit_small_patch16_224", img_size=224, patch=16, in_chans=3, lr=1e-4),
}
_DATASET_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "imagefolder": "folder"}
EVAL_GLIMPSES = (1, 2, 4, 8, 12)  # glimpse counts of the validation table (up to the budget), plus "all"
_EVAL_SEED = 20251117  # fixed: every run is evaluated on the same canvases and glimpses


@dataclass
class TrainConfig:
    """Everything a training run depends on (the CLI flags map one to one; None = dataset default)."""

    # data
    dataset: str = "fashion-mnist"  # fashion-mnist | imagenet | folder
    data_root: str | None = None  # Fashion-MNIST IDX folder / ImageNet root / image folder
    train_split: str | None = "train"  # sub-folder for folder/imagenet ("" = the root itself)
    val_split: str | None = "val"
    clutter: int = 4  # Fashion-MNIST clutter fragments per canvas (as in AVE-FashionMNIST-v0)
    workers: int = 4  # DataLoader workers (folder/imagenet only)
    # model
    model: str | None = None  # timm name
    pretrained: bool = False  # timm hub weights (local hub cache)
    weights: str | None = None  # local timm weights file
    init: str | None = None  # avex checkpoint to start from (same architecture): continue or fine-tune a run
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    img_size: int | None = None
    patch: int | None = None
    in_chans: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pos_init: str = "sincos"  # position embedding init when training from scratch: sincos (MAE 2-D) | learned (timm's)
    glimpse: int = 2  # glimpse side g in patches
    budget: int = 12  # glimpses of an episode
    train_k: tuple[int, ...] | None = None  # split points drawn per batch (None: every K in 0..depth, TORE's policy)
    # optimisation
    epochs: float = 30.0
    steps: int | None = None  # fixed number of optimisation steps (overrides epochs)
    batch_size: int = 256  # GLOBAL batch, split across ranks
    lr: float | None = None  # peak learning rate (dataset default)
    weight_decay: float = 0.05
    warmup: float = 0.05  # linear warm-up, fraction of all steps
    label_smoothing: float = 0.0
    recon_weight: float = 0.1
    grad_clip: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    compile: bool = False  # torch.compile each ViT block (dynamic shapes; CUDA)
    seed: int = 0
    device: str | None = None  # default: cuda:LOCAL_RANK if available, else cpu
    # evaluation, logging, saving
    eval_every: float = 0.0  # epochs between evaluations on a fixed subset (0: only at the end)
    eval_subset: int = 2000  # images of the periodic evaluation
    eval_size: int = 0  # images of the final evaluation (0: the whole test/val split)
    eval_batch_size: int = 500
    out: str = "runs/tore"  # checkpoint path (``.safetensors``, ``.json``, ``.eval.md``, ``.eval.json``)
    save_every: float = 0.0  # epochs between checkpoints (0: only at the end)
    half: bool = False  # store fp16 weights
    log_json: str | None = None  # JSON Lines file: one record per optimisation step
    log_every: int = 25  # steps between progress updates (each one syncs the GPU once)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, recorded in the checkpoint


# ----------------------------------------------------------------------------------------------
# The training policy: K, T and non-overlapping glimpses
# ----------------------------------------------------------------------------------------------


def step_rngs(seed: int, step: int, device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
    """Host and device generators of one step, seeded by (seed, step): identical on every rank."""
    host_seq, device_seq = np.random.SeedSequence([seed, step]).spawn(2)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(device_seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
    return np.random.default_rng(host_seq), gen


def draw_k_and_t(
    rng: np.random.Generator, depth: int, budget: int, n_tiles: int, ks: Sequence[int] | None = None
) -> tuple[int, int]:
    """One split point K ~ U{0..depth} (TORE's policy; or uniform over ``ks``); T ~ U{1..budget} or
    U{budget..n_tiles} with probability 1/2 each."""
    K = int(rng.integers(0, depth + 1)) if ks is None else int(ks[int(rng.integers(0, len(ks)))])
    T = int(rng.integers(1, budget + 1)) if rng.random() < 0.5 else int(rng.integers(budget, n_tiles + 1))
    return K, T


def n_tiles(geo: GlimpseGeometry) -> int:
    """Non-overlapping g x g tiles of the unshifted lattice (all patches when g divides the grid)."""
    return (geo.grid[0] // geo.glimpse) * (geo.grid[1] // geo.glimpse)


def sample_glimpses(
    geo: GlimpseGeometry, batch: int, T: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """T random non-overlapping glimpses per image, with a random lattice shift per image.

    Image i draws a shift (dy, dx) in {0..g-1}^2 among the shifts whose lattice holds at least T
    glimpses, then T distinct positions of the lattice {(dy + a*g, dx + b*g)} that fit in the grid
    (random scores over the unshifted lattice, -inf where a position does not fit, top-T).

    Returns:
        rows, cols: int64 [batch, T] top-left patches, on the generator's device.
    """
    g, (gh, gw), dev = geo.glimpse, geo.grid, generator.device
    ph, pw = gh // g, gw // g  # the largest lattice (shift 0)
    if not 1 <= T <= ph * pw:
        raise ValueError(f"T={T} non-overlapping {g}x{g} glimpses do not fit the {gh}x{gw} grid (at most {ph * pw})")
    shift = torch.arange(g, device=dev)
    fits = (((gh - shift) // g)[:, None] * ((gw - shift) // g)[None, :]).flatten() >= T  # [g*g] shifts holding T
    score = torch.rand(batch, g * g, generator=generator, device=dev).masked_fill(~fits, -1.0)
    s = score.argmax(dim=1)
    dy, dx = s // g, s % g  # [B]
    lat_r = dy[:, None] + torch.arange(ph, device=dev)[None] * g  # [B, ph]
    lat_c = dx[:, None] + torch.arange(pw, device=dev)[None] * g  # [B, pw]
    ok = (lat_r + g <= gh)[:, :, None] & (lat_c + g <= gw)[:, None, :]  # [B, ph, pw]
    score = torch.rand(batch, ph * pw, generator=generator, device=dev).masked_fill(~ok.flatten(1), float("-inf"))
    idx = score.topk(T, dim=1).indices  # [B, T]
    return dy[:, None] + (idx // pw) * g, dx[:, None] + (idx % pw) * g


def cut_glimpses(
    geo: GlimpseGeometry, canvases: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels, token coordinates and revealed patches of T glimpses per image.

    Args:
        canvases: [B, H, W, C] (uint8).
        rows, cols: int64 [B, T] top-left patches.

    Returns:
        pixels [B, T, C, s, s], coords int64 [B, T, G, 2], seen bool [B, N] (patches some glimpse revealed).
    """
    b, t = rows.shape
    r, c = rows.reshape(-1), cols.reshape(-1)
    rep = canvases[:, None].expand(b, t, *canvases.shape[1:]).reshape(b * t, *canvases.shape[1:])
    s, p = geo.sensor_pixels, geo.patch
    pixels = geo.cut(rep, r, c).reshape(b, t, canvases.shape[-1], s, s)
    coords = geo.glimpse_coords(r, c).reshape(b, t, geo.tokens_per_glimpse, 2)
    boxes = torch.stack([r * p, c * p, r * p + s, c * p + s], dim=-1).float()
    seen = geo.visited_patches(boxes).reshape(b, t, geo.num_patches).any(dim=1)
    return pixels, coords, seen


class TOREObjective(nn.Module):
    """The training loss as a module (so DDP wraps one ``forward``): CE + recon_weight x masked MSE.

    ``forward(canvases [B,H,W,C] uint8, labels [B], rows [B,T], cols [B,T], K)`` returns
    ``(loss, ce, mse, logits)``; the last three detached. Both terms are per-rank means over images
    (the MSE first averaged over each image's unobserved patches), so DDP's gradient average equals
    the gradient of the global-batch loss.
    """

    def __init__(
        self, model: TOREViT, geo: GlimpseGeometry, recon_weight: float = 0.1, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.model = model
        self.geo = geo
        self.recon_weight = recon_weight
        self.label_smoothing = label_smoothing

    def forward(self, canvases: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, K: int):
        model = self.model
        pixels, coords, seen = cut_glimpses(self.geo, canvases, rows, cols)
        out = model.forward_glimpses(pixels, coords, K)
        ce = F.cross_entropy(out.logits.float(), labels, label_smoothing=self.label_smoothing)
        mse = ce.new_zeros(())
        if self.recon_weight and model.decoder is not None:
            recon, _ = model.decode(out, entropy=False)  # [B, N, p*p*C]; fused attention, no entropy map
            mse = masked_recon_mse(model, recon, canvases, seen)
        loss = ce + self.recon_weight * mse
        return loss, ce.detach(), mse.detach(), out.logits.detach()


def train_step(
    objective: nn.Module,
    model: TOREViT,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    K: int,
    amp: bool = True,
    grad_clip: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step: the objective under bf16 autocast (CUDA, ``amp``), backward, clipping, optimiser step.

    Args:
        objective: a :class:`TOREObjective`, or DDP around one (which averages the gradients across ranks).
        model: the TOREViT inside it (its gradients are clipped to norm ``grad_clip``; 0: no clipping).
        batch: this rank's (canvases uint8 [B, H, W, C], labels [B], rows [B, T], cols [B, T]).

    Returns:
        (loss, ce, mse, logits [B, classes]), detached, from before the step.
    """
    canvases, labels, rows, cols = batch
    with _autocast(canvases.device, amp):
        loss, ce, mse, logits = objective(canvases, labels, rows, cols, K)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), ce, mse, logits


def masked_recon_mse(model: TOREViT, recon: torch.Tensor, canvases: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """TORE's reconstruction loss: MSE in normalised pixel space on the patches no glimpse revealed.

    Args:
        recon: [B, N, p*p*C] the decoder's pixels; canvases: [B, H, W, C] uint8; seen: [B, N] bool.

    Returns:
        fp32 scalar: per image the mean over its unseen patches, then the mean over images.
    """
    target = model.patchify(model.normalize(canvases.permute(0, 3, 1, 2)))
    err = (recon.float() - target).square().mean(dim=-1)  # [B, N]
    hidden = (~seen).float()
    return ((err * hidden).sum(dim=1) / hidden.sum(dim=1).clamp(min=1.0)).mean()


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def fashion_mnist_canvases(
    split: str, device: torch.device | str, img_size: int, clutter: int, root: str | None = None
):
    """Fashion-MNIST canvases as AVE-FashionMNIST-v0 draws them, at any canvas size.

    The items are scaled by ``img_size // 56`` (112 px: x2, as the env) and the clutter fragments are 16 px
    (at most the scaled item's side). Returns an :class:`avex.data.FashionMNISTCanvas`.
    """
    from avex.data import FashionMNISTCanvas

    scale = max(1, img_size // 56)
    return FashionMNISTCanvas(
        split=split,
        device=device,
        root=root,
        canvas_size=img_size,
        scale=scale,
        n_clutter=clutter,
        fragment=min(16, 28 * scale),
    )


class _FolderImages(torch.utils.data.Dataset):
    """Images of an ImageFolderCanvas by index: (uint8 [H, W, C], label). Unreadable files fall through to the next."""

    def __init__(self, source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.source)
        for k in range(min(n, 20)):
            i = (index + k) % n
            try:
                return torch.from_numpy(self.source.load(i)), int(self.source.targets[i])
            except Exception as err:  # PIL raises many types on bad files
                warnings.warn(f"skipping unreadable image {self.source.files[i]}: {err}", RuntimeWarning, stacklevel=2)
        raise RuntimeError(f"20 consecutive unreadable images from index {index} in {self.source.root}")


class _GlobalBatchSampler:
    """Endless index batches: global batches from per-epoch permutations seeded by (seed, epoch); yields this rank's slice."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int) -> None:
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed

    def __iter__(self) -> Iterator[list[int]]:
        local = self.global_batch // self.world
        buf, epoch = np.empty(0, dtype=np.int64), 0
        while True:
            while len(buf) < self.global_batch:
                buf = np.concatenate([buf, np.random.default_rng([self.seed, epoch]).permutation(self.n)])
                epoch += 1
            idx, buf = buf[: self.global_batch], buf[self.global_batch :]
            yield idx[self.rank * local : (self.rank + 1) * local].tolist()


def _folder_sources(cfg: TrainConfig, img_size: int, in_chans: int):
    """(train source, eval source) ImageFolderCanvas for dataset 'folder' or 'imagenet'."""
    from avex.data import ImageFolderCanvas, imagenet_canvas

    tr, va = cfg.train_split or None, cfg.val_split or None
    if cfg.dataset == "imagenet":
        train = imagenet_canvas(cfg.data_root, split=tr, image_size=img_size)
        root = Path(cfg.data_root or os.environ.get("AVEX_IMAGENET", "")).expanduser()
        val = imagenet_canvas(cfg.data_root, split=va, image_size=img_size) if va and (root / va).is_dir() else None
    else:
        if cfg.data_root is None:
            raise ValueError("--dataset folder needs --data-root (a folder of class sub-folders)")
        root = Path(cfg.data_root).expanduser()
        if tr and not (root / tr).is_dir():
            tr = None  # no train/ sub-folder: the root holds the class folders
        train = ImageFolderCanvas(root, image_size=img_size, split=tr, in_chans=in_chans)
        val = (
            ImageFolderCanvas(root, image_size=img_size, split=va, classes=train.classes, in_chans=in_chans)
            if va and (root / va).is_dir()
            else None
        )
    if val is None:
        warnings.warn(f"no validation split {va!r} under {cfg.data_root}: evaluating on training images", stacklevel=2)
        val = train
    return train, val


def _fashion_eval_set(source, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed test canvases: the first ``size`` items (0: all), each once, layouts from a fixed seed."""
    n = len(source) if size <= 0 else min(size, len(source))
    rng = np.random.default_rng(_EVAL_SEED)
    lay = source.sample_layouts([rng] * n, list(range(n)))  # one generator, rows drawn in order
    canvases, labels = source.compose(lay)
    return canvases.to(device), labels.to(device)


def _eval_batches(
    eval_data, batch_size: int, device: torch.device, limit: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (canvases uint8 [B,H,W,C], labels [B]) on device from a tensor pair or an image source."""
    if isinstance(eval_data, tuple):
        canvases, labels = eval_data
        n = len(labels) if limit <= 0 else min(limit, len(labels))
        for i in range(0, n, batch_size):
            yield canvases[i : min(i + batch_size, n)], labels[i : min(i + batch_size, n)]
        return
    n = len(eval_data) if limit <= 0 else min(limit, len(eval_data))
    order = np.sort(np.random.default_rng(_EVAL_SEED).permutation(len(eval_data))[:n])  # fixed subset
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(_FolderImages(eval_data), order.tolist()),
        batch_size=batch_size,
        num_workers=min(4, os.cpu_count() or 1),
    )
    for canvases, labels in loader:
        yield canvases.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Evaluation: accuracy per K x glimpse count
# ----------------------------------------------------------------------------------------------


def eval_columns(budget: int, geo: GlimpseGeometry) -> list[int | str]:
    """Glimpse counts of the table: 1, 2, 4, 8, 12 up to the budget (and the budget), then 'all' when g tiles the grid."""
    cols: list[int | str] = sorted({t for t in EVAL_GLIMPSES if t <= budget} | {budget})
    cols = [t for t in cols if t <= n_tiles(geo)]
    if geo.grid[0] % geo.glimpse == 0 and geo.grid[1] % geo.glimpse == 0:
        cols.append("all")
    return cols


@torch.inference_mode()
def evaluate(
    model: TOREViT, batches, geo: GlimpseGeometry, ks: list[int], columns: list[int | str], amp: bool = True
) -> dict[str, Any]:
    """Top-1 accuracy (%) for every K in ``ks`` and glimpse count in ``columns``.

    Glimpses are random, non-overlapping, shift included, drawn from a fixed seed per (batch, count),
    so every K sees the same glimpses; 'all' reveals every patch (``model.tile``).

    Returns:
        dict(ks, columns, n, acc={"K=k": {"count": accuracy}}).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = {(k, str(c)): 0 for k in ks for c in columns}
    n = 0
    for bi, (canvases, labels) in enumerate(batches):
        b = len(labels)
        for c in columns:
            if c == "all":
                pixels, coords = model.tile(canvases.permute(0, 3, 1, 2), geo.glimpse)
            else:
                gen = torch.Generator(device=device)
                gen.manual_seed(_EVAL_SEED + 1000 * bi + int(c))
                pixels, coords, _ = cut_glimpses(geo, canvases, *sample_glimpses(geo, b, int(c), gen))
            for k in ks:
                with _autocast(device, amp):
                    logits = model.forward_glimpses(pixels, coords, k).logits
                correct[(k, str(c))] += int((logits.argmax(-1) == labels).sum())
        n += b
    model.train(was_training)
    acc = {f"K={k}": {str(c): 100.0 * correct[(k, str(c))] / max(n, 1) for c in columns} for k in ks}
    return dict(ks=list(ks), columns=[str(c) for c in columns], n=n, acc=acc)


def eval_markdown(table: dict[str, Any]) -> str:
    """The evaluation table as Markdown: rows K, columns glimpse counts."""
    cols = table["columns"]
    lines = [
        f"Top-1 accuracy (%) on {table['n']} images; columns: glimpses (random, non-overlapping), 'all': every patch.",
        "",
        "| K | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for k in table["ks"]:
        lines.append(f"| {k} | " + " | ".join(f"{table['acc'][f'K={k}'][c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA; a no-op elsewhere."""
    return (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp)
        if device.type == "cuda"
        else torch.autocast(device_type="cpu", enabled=False)
    )


def _setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embeddings and learned tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token", "mask_token")
        (no_decay if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then half-cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the dataset defaults (model, sizes, lr) into a copy of ``cfg``."""
    name = _DATASET_ALIASES.get(cfg.dataset, cfg.dataset)
    if name not in DATASET_DEFAULTS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {sorted(DATASET_DEFAULTS)}")
    values = asdict(cfg)
    values["dataset"] = name
    for key, default in DATASET_DEFAULTS[name].items():
        if values.get(key) is None:
            values[key] = default
    for key in ("mean", "std"):
        if values[key] is not None:
            values[key] = tuple(float(v) for v in values[key])
    if values["train_k"] is not None:
        values["train_k"] = tuple(sorted({int(k) for k in values["train_k"]}))
    return TrainConfig(**values)


def build_model(cfg: TrainConfig, num_classes: int) -> TOREViT:
    """create_tore from a resolved config."""
    extra = {
        k: v
        for k, v in dict(depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads).items()
        if v is not None
    }
    return create_tore(
        cfg.model,
        img_size=cfg.img_size,
        patch_size=cfg.patch,
        in_chans=cfg.in_chans,
        num_classes=num_classes,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        mean=cfg.mean,
        std=cfg.std,
        **extra,
    )


@torch.no_grad()
def init_sincos_pos_embed(model: TOREViT) -> None:
    """Start the (still learned) position embedding from MAE's fixed 2-D sin-cos table, prefix slots at 0.

    From scratch this gives every token its grid position from step one, which a random init has to learn.
    """
    pe = model.vit.pos_embed
    off = 0 if model.vit.no_embed_class else model.num_prefix
    pe[0, off:] = sincos_2d(grid_coords(model.grid, pe.device), model.embed_dim).to(pe.dtype)
    pe[0, :off] = 0


def start_from_checkpoint(model: TOREViT, path: str) -> dict[str, Any]:
    """Load an avex checkpoint's weights into ``model`` (``--init``): its build must equal the run's.

    Returns:
        the checkpoint's meta (recorded as ``init_from`` in the new checkpoint).

    Raises:
        ValueError: naming the first build field that differs (another architecture, image size, classes...).
    """
    src = load_tore(path, expect=model.build_args)
    load_state(model, src.state_dict(), path)
    return dict(src.meta)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train_classifier(cfg: TrainConfig) -> dict[str, Any]:
    """Train a TORE classifier, evaluate it and save it (rank 0). Returns a summary (with ``model``)."""
    cfg = resolve_config(cfg)
    rank, world, device = _setup_distributed(cfg.device)
    main_rank = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    local_batch = cfg.batch_size // world
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # model init: the same on every rank (DDP also broadcasts rank 0's weights)

    # --- data -------------------------------------------------------------------------------
    loader_iter = None
    if cfg.dataset == "fashion-mnist":
        train_source = fashion_mnist_canvases("train", device, cfg.img_size, cfg.clutter, cfg.data_root)
        eval_source = (
            fashion_mnist_canvases("test", device, cfg.img_size, cfg.clutter, cfg.data_root) if main_rank else None
        )
        class_names, train_len = train_source.class_names, len(train_source)
        if cfg.in_chans != 1:
            raise ValueError("Fashion-MNIST canvases have one channel: use --in-chans 1")
    else:
        train_source, eval_source = _folder_sources(cfg, cfg.img_size, cfg.in_chans)
        class_names, train_len = train_source.class_names, len(train_source)
        loader = torch.utils.data.DataLoader(
            _FolderImages(train_source),
            batch_sampler=_GlobalBatchSampler(train_len, cfg.batch_size, rank, world, cfg.seed),
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        loader_iter = iter(loader)

    # --- model, objective, optimiser -----------------------------------------------------------
    model = build_model(cfg, len(class_names)).to(device).train()
    init_meta = None
    if cfg.init:
        init_meta = start_from_checkpoint(model, cfg.init)
    elif cfg.pos_init == "sincos" and not (cfg.pretrained or cfg.weights):
        init_sincos_pos_embed(model)
    elif cfg.pos_init not in ("sincos", "learned"):
        raise ValueError(f"--pos-init must be sincos or learned, got {cfg.pos_init!r}")
    if cfg.compile:  # per module, in place: one graph serves every K and T (state_dict keys unchanged)
        # The ViT's blocks only: inductor (torch 2.11, CUDA) fails with an AssertionError in get_pw_red_splits
        # on the decoder, both as a whole and per block (H200 DDP job, benchmarks/results/h200x2/).
        for blk in model.vit.blocks:
            blk.compile(dynamic=True)
    geo = model.geometry(cfg.glimpse, stride=1)
    tiles = n_tiles(geo)
    if cfg.train_k is not None and (not cfg.train_k or not all(0 <= k <= model.depth for k in cfg.train_k)):
        raise ValueError(
            f"--train-k {list(cfg.train_k)}: every split point must be in 0..{model.depth} (the model's depth)"
        )
    if not 1 <= cfg.budget <= tiles:
        raise ValueError(
            f"--budget {cfg.budget} must be in 1..{tiles} (non-overlapping {cfg.glimpse}x{cfg.glimpse} glimpses of the {geo.grid} grid)"
        )
    objective = TOREObjective(model, geo, cfg.recon_weight, cfg.label_smoothing)
    ddp = (
        nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
        if world > 1
        else objective
    )
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda"
    )
    steps_per_epoch = max(1, train_len // cfg.batch_size)
    total_steps = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    warmup = max(1, round(cfg.warmup * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, warmup))
    every = lambda epochs: max(1, round(epochs * steps_per_epoch)) if epochs and epochs > 0 else 0  # noqa: E731
    eval_every, save_every = every(cfg.eval_every), every(cfg.save_every)
    ks = model.report_ks
    columns = eval_columns(cfg.budget, geo)
    eval_data = None
    if main_rank:
        eval_data = (
            _fashion_eval_set(eval_source, cfg.eval_size, device) if cfg.dataset == "fashion-mnist" else eval_source
        )
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"[avex.train] {cfg.dataset}: {train_len} training images, {len(class_names)} classes; {cfg.model} depth {model.depth} "
            f"width {model.embed_dim}, {n_params / 1e6:.2f} M parameters; grid {geo.grid}, glimpse {cfg.glimpse}, budget {cfg.budget}, "
            f"{tiles} tiles; {world} process(es) on {device_name(device)}; global batch {cfg.batch_size}, {total_steps} steps "
            f"({total_steps / steps_per_epoch:.1f} epochs)",
            flush=True,
        )
    log_file = None
    if main_rank and cfg.log_json:
        Path(cfg.log_json).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(cfg.log_json, "w")  # noqa: SIM115

    def save(eval_table: dict | None, train_time: float) -> Path:
        meta = dict(
            dataset=cfg.dataset,
            class_names=class_names,
            image_size=cfg.img_size,
            patch=cfg.patch,
            glimpse=cfg.glimpse,
            budget=cfg.budget,
            clutter=cfg.clutter if cfg.dataset == "fashion-mnist" else None,
            train_args={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            eval=eval_table,
            train_time_s=round(train_time, 1),
            steps=step + 1,
            world_size=world,
            device=device_name(device),
            torch=torch.__version__,
        )
        if init_meta is not None:  # the run this one continued: its recipe, time and results (recursively)
            meta["init_from"] = {
                k: init_meta[k]
                for k in ("train_args", "train_time_s", "steps", "device", "eval", "init_from")
                if k in init_meta
            }
        return save_tore(model, cfg.out, meta=meta, half=cfg.half)

    # --- the loop -----------------------------------------------------------------------------
    pending: list[tuple[int, int, int, float, torch.Tensor]] = []  # (step, K, T, lr, [loss, ce, mse, acc])
    recent: dict[str, float] = {}
    timed_images, timed_seconds = 0, 0.0
    bar = tqdm(total=total_steps, disable=not (main_rank and cfg.progress), dynamic_ncols=True, desc="train")
    t_start = t_mark = time.perf_counter()
    images_since = 0
    step = -1
    for step in range(total_steps):
        host_rng, gen = step_rngs(cfg.seed, step, device)
        K, T = draw_k_and_t(host_rng, model.depth, cfg.budget, tiles, cfg.train_k)
        mine = slice(rank * local_batch, (rank + 1) * local_batch)
        if loader_iter is None:  # Fashion-MNIST canvases, drawn for the global batch on the device
            canvases, labels = train_source.random_batch(cfg.batch_size, gen)
            canvases, labels = canvases[mine], labels[mine]
        else:  # this rank's images of the global batch; flips drawn for the global batch
            canvases, labels = next(loader_iter)
            canvases, labels = canvases.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            flip = (torch.rand(cfg.batch_size, generator=gen, device=device) < 0.5)[mine]
            canvases = torch.where(flip[:, None, None, None], canvases.flip(2), canvases)
        rows, cols = sample_glimpses(geo, cfg.batch_size, T, gen)
        rows, cols = rows[mine], cols[mine]

        loss, ce, mse, logits = train_step(
            ddp, model, optimizer, (canvases, labels, rows, cols), K, cfg.amp, cfg.grad_clip
        )
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        acc = (logits.argmax(-1) == labels).float().mean()
        pending.append((step, K, T, lr, torch.stack([loss.detach().float(), ce.float(), mse.float(), acc])))
        images_since += local_batch
        bar.update(1)
        last = step + 1 == total_steps
        if (step + 1) % cfg.log_every == 0 or last:
            stats = torch.stack([p[-1] for p in pending])  # [n, 4]
            if world > 1:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)
                stats /= world
            values = stats.tolist()  # the one GPU sync of the interval
            now = time.perf_counter()
            rate = images_since / (now - t_mark)  # images/s per process
            if step + 1 > cfg.log_every:  # the first interval includes warm-up (allocations, autotuning)
                timed_images, timed_seconds = timed_images + images_since, timed_seconds + (now - t_mark)
            t_mark, images_since = now, 0
            mean = np.mean(values, axis=0)
            recent = dict(loss=float(mean[0]), ce=float(mean[1]), mse=float(mean[2]), acc=float(mean[3]))
            bar.set_postfix(loss=f"{mean[0]:.3f}", acc=f"{100 * mean[3]:.1f}", img_s=f"{rate:.0f}", refresh=False)
            if log_file is not None:
                for (s, k, t, l_r, _), v in zip(pending, values):
                    log_file.write(
                        json.dumps(dict(step=s, K=k, T=t, lr=l_r, loss=v[0], ce=v[1], mse=v[2], acc=v[3], img_s=rate))
                        + "\n"
                    )
                log_file.flush()
            pending.clear()
        if main_rank and eval_every and (step + 1) % eval_every == 0 and not last:
            table = evaluate(
                model, _eval_batches(eval_data, cfg.eval_batch_size, device, cfg.eval_subset), geo, ks, columns, cfg.amp
            )
            bar.write(
                f"step {step + 1}: "
                + ", ".join(
                    f"{k} all {table['acc'][k].get('all', float('nan')):.1f} / "
                    f"{cfg.budget} {table['acc'][k].get(str(cfg.budget), float('nan')):.1f}"
                    for k in table["acc"]
                )
            )
        if main_rank and save_every and (step + 1) % save_every == 0 and not last:
            save(None, time.perf_counter() - t_start)
    synchronize(device)
    train_time = time.perf_counter() - t_start
    bar.close()
    if log_file is not None:
        log_file.close()
    img_s = timed_images / timed_seconds if timed_seconds else total_steps * local_batch / train_time
    summary: dict[str, Any] = dict(
        model=model,
        steps=total_steps,
        train_time_s=train_time,
        images_per_s_per_process=img_s,
        final=recent,
        rank=rank,
        world_size=world,
    )

    # --- final evaluation and checkpoint (rank 0) -------------------------------------------------
    if main_rank:
        table = evaluate(
            model, _eval_batches(eval_data, cfg.eval_batch_size, device, cfg.eval_size), geo, ks, columns, cfg.amp
        )
        md = eval_markdown(table)
        print(
            f"[avex.train] {total_steps} steps in {train_time:.1f} s, {img_s:.0f} images/s per process; last loss "
            f"{recent.get('loss', float('nan')):.4f}, train acc {100 * recent.get('acc', float('nan')):.1f}%\n{md}",
            flush=True,
        )
        path = save(table, train_time)
        stem = path.with_suffix("")
        Path(f"{stem}.eval.md").write_text(md + "\n")
        Path(f"{stem}.eval.json").write_text(json.dumps(table, indent=2) + "\n")
        size_mb = path.stat().st_size / 2**20
        print(f"[avex.train] saved {path} ({size_mb:.1f} MiB) and {stem}.eval.md/.json", flush=True)
        summary.update(checkpoint=str(path), eval=table, eval_markdown=md, checkpoint_mib=size_mb)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training flags to ``parser`` (e.g. the ``avex train classifier`` sub-command)."""
    d = TrainConfig()
    a = parser.add_argument_group("data")
    a.add_argument("--dataset", default=d.dataset, help="fashion-mnist | imagenet | folder (default %(default)s)")
    a.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder, ImageNet root or image folder")
    a.add_argument(
        "--train-split", default=d.train_split, help="sub-folder of --data-root for training (default %(default)s)"
    )
    a.add_argument(
        "--val-split", default=d.val_split, help="sub-folder of --data-root for evaluation (default %(default)s)"
    )
    a.add_argument(
        "--clutter",
        type=int,
        default=d.clutter,
        help="Fashion-MNIST clutter fragments per canvas (default %(default)s)",
    )
    a.add_argument(
        "--workers", type=int, default=d.workers, help="DataLoader workers for image folders (default %(default)s)"
    )
    m = parser.add_argument_group("model (defaults depend on --dataset)")
    m.add_argument("--model", default=None, help="timm model name")
    m.add_argument("--pretrained", action="store_true", help="timm hub weights (from the local cache)")
    m.add_argument("--weights", default=None, help="local timm weights file to start from")
    m.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="avex checkpoint (.safetensors + .json) to start from: continue or fine-tune a run of the same architecture",
    )
    m.add_argument("--depth", type=int, default=None)
    m.add_argument("--embed-dim", type=int, default=None)
    m.add_argument("--num-heads", type=int, default=None)
    m.add_argument("--img-size", type=int, default=None, help="canvas side in pixels")
    m.add_argument("--patch", type=int, default=None, help="ViT patch side in pixels")
    m.add_argument("--in-chans", type=int, default=None)
    m.add_argument("--mean", type=_floats, default=None, help="pixel mean per channel, comma-separated")
    m.add_argument("--std", type=_floats, default=None, help="pixel std per channel, comma-separated")
    m.add_argument(
        "--pos-init",
        choices=("sincos", "learned"),
        default=d.pos_init,
        help="position embedding init from scratch: MAE 2-D sin-cos or timm's random (default %(default)s)",
    )
    m.add_argument("--glimpse", type=int, default=d.glimpse, help="glimpse side in patches (default %(default)s)")
    m.add_argument("--budget", type=int, default=d.budget, help="glimpses per episode (default %(default)s)")
    m.add_argument(
        "--train-k",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="split points to draw per batch (default: every K in 0..depth, TORE's policy; e.g. 6 to fine-tune for one K)",
    )
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=float, default=d.epochs, help="(default %(default)s)")
    o.add_argument("--steps", type=int, default=None, help="fixed number of optimisation steps (overrides --epochs)")
    o.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="global batch, split across processes (default %(default)s)",
    )
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (fashion-mnist 1e-3, else 1e-4)")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default %(default)s)")
    o.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of all steps (default %(default)s)")
    o.add_argument(
        "--label-smoothing",
        type=float,
        nargs="?",
        const=0.1,
        default=d.label_smoothing,
        help="label smoothing (flag alone: 0.1; default %(default)s)",
    )
    o.add_argument(
        "--recon-weight", type=float, default=d.recon_weight, help="weight of the masked MSE (default %(default)s)"
    )
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="(default %(default)s; 0: off)")
    o.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA (default: bf16 autocast)")
    o.add_argument(
        "--compile", action="store_true", help="torch.compile the ViT's blocks (no gain measured on an H100)"
    )
    o.add_argument("--seed", type=int, default=d.seed)
    o.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    e = parser.add_argument_group("evaluation, logging, checkpoints")
    e.add_argument(
        "--eval-every",
        type=float,
        default=d.eval_every,
        help="epochs between evaluations on a fixed subset (0: end only)",
    )
    e.add_argument(
        "--eval-subset", type=int, default=d.eval_subset, help="images of the periodic evaluation (default %(default)s)"
    )
    e.add_argument("--eval-size", type=int, default=d.eval_size, help="images of the final evaluation (0: whole split)")
    e.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    e.add_argument("--out", default=d.out, help="checkpoint path without suffix (default %(default)s)")
    e.add_argument("--save-every", type=float, default=d.save_every, help="epochs between checkpoints (0: end only)")
    e.add_argument("--half", action="store_true", help="store fp16 weights")
    e.add_argument(
        "--log-json", default=None, help="JSON Lines file, one record per step (loss, ce, mse, acc, K, T, lr)"
    )
    e.add_argument(
        "--log-every", type=int, default=d.log_every, help="steps between progress updates (default %(default)s)"
    )
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags (attributes that are not config fields are ignored)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})


def main_from_args(args: argparse.Namespace) -> int:
    """Entry point for an argparse sub-command whose parser went through :func:`add_arguments`."""
    train_classifier(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(
        argparse.ArgumentParser(
            prog="avex train classifier",
            description=__doc__.split("\n\n")[0],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
