"""The training objective and one optimisation step.

loss = cross-entropy of the classifier after all T glimpses at split point K
       + recon_weight x MSE of the decoder's reconstruction on the patches no glimpse revealed
       [+ distill x KL(teacher || student): self-distillation (``--distill``), the teacher being the same
          model's prediction on the full view (every patch, K=0) without gradient, the student the
          prediction after the T glimpses at K; both softened by ``distill_temp``, the KL scaled by its square
          as in Hinton et al.'s distillation so that its gradient keeps its size across temperatures].

Both terms are per-rank means over images, so DDP's average of the per-rank gradients equals the
gradient of the same loss over the global batch: N processes train the same weights as one.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from avex.geometry import GlimpseGeometry
from avex.model import TOREViT
from avex.train.policy import cut_continuous_glimpses, cut_glimpses
from avex.train.runtime import autocast

__all__ = ["TOREObjective", "distill_kl", "full_view_logits", "masked_recon_mse", "train_step"]


class TOREObjective(nn.Module):
    """The training loss as a module (so DDP wraps one ``forward``): CE + recon_weight x masked MSE
    (+ distill x KL to the full view).

    ``forward(canvases [B,H,W,C] uint8, labels [B], rows [B,T], cols [B,T], K, yxz=None)`` returns
    ``(loss, ce, mse, logits)``; the last three detached. The MSE is first averaged over each image's
    unobserved patches, then over images. ``yxz`` float [B, T, 3]: continuous glimpses instead of the grid
    glimpses at (rows, cols), which are then not read (:func:`~avex.train.policy.cut_continuous_glimpses`).
    """

    def __init__(
        self,
        model: TOREViT,
        geo: GlimpseGeometry,
        recon_weight: float = 0.1,
        label_smoothing: float = 0.0,
        distill: float = 0.0,
        distill_temp: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.geo = geo
        self.recon_weight = recon_weight
        self.label_smoothing = label_smoothing
        self.distill = distill
        self.distill_temp = distill_temp

    def forward(
        self,
        canvases: torch.Tensor,
        labels: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        K: int,
        yxz: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        if yxz is None:
            pixels, coords, seen = cut_glimpses(self.geo, canvases, rows, cols)
        else:
            pixels, coords, seen = cut_continuous_glimpses(self.geo, canvases, yxz)
        out = model.forward_glimpses(pixels, coords, K)
        ce = F.cross_entropy(out.logits.float(), labels, label_smoothing=self.label_smoothing)
        mse = ce.new_zeros(())
        if self.recon_weight and model.decoder is not None:
            recon, _ = model.decode(out, entropy=False)  # [B, N, p*p*C]; fused attention, no entropy map
            mse = masked_recon_mse(model, cast(torch.Tensor, recon), canvases, seen)  # recon=True: never None
        loss = ce + self.recon_weight * mse
        if self.distill:  # off: not a single op more, so the loss is bit for bit the one without the option
            teacher = full_view_logits(model, self.geo, canvases)
            loss = loss + self.distill * distill_kl(teacher, out.logits.float(), self.distill_temp)
        return loss, ce.detach(), mse.detach(), out.logits.detach()


@torch.no_grad()
def full_view_logits(model: TOREViT, geo: GlimpseGeometry, canvases: torch.Tensor) -> torch.Tensor:
    """The distillation teacher: the model's own logits with every patch revealed at K=0, without gradient.

    At K=0 no block runs before the aggregator, so the tiled canvas is the plain ViT on the whole image
    (the evaluation's 'all' column at K=0). The canvas is tiled by the g x g glimpses where they tile the grid
    (as the evaluation does), else by single patches (the same tokens).

    Args:
        canvases: [B, H, W, C] uint8.

    Returns:
        float32 [B, classes], detached.
    """
    g = geo.glimpse if geo.grid[0] % geo.glimpse == 0 and geo.grid[1] % geo.glimpse == 0 else 1
    pixels, coords = model.tile(canvases.permute(0, 3, 1, 2), g)
    return model.forward_glimpses(pixels, coords, 0).logits.float()


def distill_kl(teacher: torch.Tensor, student: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher / temp) || softmax(student / temp)) x temp^2, the mean over images.

    Args:
        teacher, student: float [B, classes] logits (the teacher's gradient, if it has one, is not taken).

    Returns:
        fp32 scalar.
    """
    log_p = F.log_softmax(teacher.detach().float() / temp, dim=-1)
    log_q = F.log_softmax(student.float() / temp, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean() * (temp * temp)


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


def train_step(
    objective: nn.Module,
    model: TOREViT,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    K: int,
    amp: bool = True,
    grad_clip: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step: the objective under bf16 autocast (CUDA, ``amp``), backward, clipping, optimiser step.

    Args:
        objective: a :class:`TOREObjective`, or DDP around one (which averages the gradients across ranks).
        model: the TOREViT inside it (its gradients are clipped to norm ``grad_clip``; 0: no clipping).
        batch: this rank's (canvases uint8 [B, H, W, C], labels [B], rows [B, T], cols [B, T]), and for a
            batch of continuous glimpses their actions yxz float [B, T, 3] after them.

    Returns:
        (loss, ce, mse, logits [B, classes]), detached, from before the step.
    """
    canvases, labels, rows, cols, *yxz = batch
    with autocast(canvases.device, amp):
        loss, ce, mse, logits = objective(canvases, labels, rows, cols, K, *yxz)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), ce, mse, logits
