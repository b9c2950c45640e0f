"""The fused training step on layer-scale ViTs (timm's LayerScale: DeiT-III, DINOv2 blocks), on the CPU in fp32.

The fused objective gives the eager objective's loss and every gradient (each block's ``ls1.gamma`` and
``ls2.gamma`` included) up to fp32 rounding at every K; a fused step updates gamma as the eager step does;
what the fused step still does not compute (drop path, dropout, extra norms) is refused with the attribute,
its value and the timm argument that leaves it out.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest
import torch
from fused_kit import fused_equals_eager, loss_and_grads, random_batch

from avex.model import TOREViT, create_tore
from avex.train import (
    FusedObjective,
    StepPlan,
    TOREObjective,
    TrainConfig,
    plan_step,
    resolve_config,
)
from avex.train.build import param_groups
from avex.train.fused import fused_refusal
from avex.train.step import make_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(depth=3, embed_dim=32, num_heads=2, num_classes=10)


_batch = random_batch
_loss_and_grads = loss_and_grads


def _deit3(img_size: int = 48, in_chans: int = 1, **kw: Any) -> TOREViT:
    """A small DeiT-III (timm's deit3 blocks: LayerScale on both branches, no_embed_class) with random gammas."""
    model = create_tore(
        "deit3_small_patch16_224",
        img_size=img_size,
        patch_size=8,
        in_chans=in_chans,
        mean=(0.1,) * in_chans,
        std=(0.25,) * in_chans,
        **dict(TINY, **kw),
    )
    return _random_gammas(model)


def _dinov2(**kw: Any) -> TOREViT:
    """A small DINOv2 with registers (LayerScale blocks, patch 14, register tokens)."""
    model = create_tore("vit_small_patch14_reg4_dinov2", img_size=56, in_chans=3, **dict(TINY, **kw))
    return _random_gammas(model)


@torch.no_grad()
def _random_gammas(model: TOREViT) -> TOREViT:
    """Gammas away from timm's 1e-6 init (at which a wrong scale would barely change the loss)."""
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith(".gamma"):
            p.copy_(torch.rand(p.shape, generator=gen) * 0.95 + 0.05)
    return model


def _gammas(model: TOREViT) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(".gamma")]


# ------------------------------------------------------------------------------------------------
# Loss and gradients equal the eager objective's
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "T", "recon"),
    [
        (lambda: _deit3(), 3, 0.1),  # reconstruction on: 3 of 9 tiles seen
        (lambda: _deit3(), 2, 0.0),  # no reconstruction term
        (lambda: _deit3(in_chans=3, decoder_depth=2), 4, 0.1),  # channels, decoder blocks before the last
        (lambda: _dinov2(), 2, 0.1),  # DINOv2 blocks with registers, patch 14
    ],
    ids=["deit3", "deit3-no-recon", "deit3-rgb-decoder2", "dinov2-reg"],
)
def test_fused_objective_equals_eager_with_layer_scale(build, T: int, recon: float) -> None:
    torch.manual_seed(0)
    model = build()
    assert fused_refusal(model) is None
    gammas = _gammas(model)
    assert len(gammas) == 2 * model.depth  # ls1 and ls2 in every block
    for _K, _want, want_grads in fused_equals_eager(model, _batch(model, 6, T), recon):
        assert set(gammas) <= want_grads.keys()
        assert all(want_grads[n].abs().max() > 1e-4 for n in gammas), "every gamma gets a real gradient"


def test_fused_objective_equals_eager_on_deit3_small() -> None:
    """timm's deit3_small_patch16_224 itself (12 blocks, width 384, 6 heads) at 32 px: a 2x2 grid of 16-px
    patches, one-patch glimpses. Over 12 blocks fp32 rounding grows with a gradient's size (the class token's
    is ~30), so the absolute tolerance is 1e-5 of each gradient's largest entry."""
    torch.manual_seed(0)
    model = _random_gammas(create_tore("deit3_small_patch16_224", img_size=32, num_classes=10))
    assert fused_refusal(model) is None
    geo = model.geometry(1)
    batch = _batch(model, 3, 2, glimpse=1)
    eager = TOREObjective(model, geo, 0.1, label_smoothing=0.1)
    fused = FusedObjective(model, geo, 0.1, label_smoothing=0.1)
    for K in (0, 6, 12):
        want, want_grads = _loss_and_grads(eager, model, batch, K)
        got, got_grads = _loss_and_grads(fused, model, batch, K)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
        assert got_grads.keys() == want_grads.keys() and "vit.blocks.11.ls2.gamma" in want_grads
        for name, g in want_grads.items():
            atol = 1e-5 * float(g.abs().max())
            torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=atol, msg=f"K={K} {name}")


def test_fused_objective_without_gamma_would_differ() -> None:
    """The comparison above can fail: the fused objective with its layer scales left out gives another loss."""
    model = _deit3()
    batch = _batch(model, 6, 3)
    eager = TOREObjective(model, model.geometry(2), 0.1)
    fused = FusedObjective(model, model.geometry(2), 0.1)
    fused._specs = [replace(s, ls1=None, ls2=None) for s in fused._specs]
    with torch.no_grad():
        assert (eager(*batch, 1)[0] - fused(*batch, 1)[0]).abs() > 1e-3


def test_fused_steps_update_gamma_as_the_eager_steps() -> None:
    """Three steps through make_step (gradient clipping on): the same losses and weights, every gamma moved.
    SGD with momentum, whose update is linear in the gradient: AdamW's first updates are lr * sign(g), which
    turns fp32 rounding in a near-zero gradient entry into a whole step of difference."""
    models = [_deit3(), _deit3()]
    models[1].load_state_dict(models[0].state_dict())
    start = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    losses = []
    for model, fused in zip(models, (False, True)):
        opt = torch.optim.SGD(param_groups(model, 0.05), lr=0.05, momentum=0.9)
        geo = model.geometry(2)
        objective = (FusedObjective if fused else TOREObjective)(model, geo, 0.1, 0.1)
        step = make_step(StepPlan(fused, False), objective, model, opt, False, 1.0)
        draws = ((1, 3), (3, 2), (0, 4))  # (K, T)
        losses.append(torch.stack([step(_batch(model, 6, T, seed=i), K) for i, (K, T) in enumerate(draws)]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=2e-6)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    moved = dict(models[1].named_parameters())
    assert all((moved[n] - start[n]).abs().max() > 1e-4 for n in _gammas(models[1]))


def test_gamma_has_no_weight_decay() -> None:
    """gamma is 1-D: avex's AdamW groups leave it without weight decay, as timm's own groups do."""
    model = _deit3()
    no_decay = {id(p) for p in param_groups(model, 0.05)[1]["params"]}
    gammas = [p for n, p in model.named_parameters() if n.endswith(".gamma")]
    assert gammas and all(id(p) in no_decay for p in gammas)


# ------------------------------------------------------------------------------------------------
# What the fused step takes and what it refuses
# ------------------------------------------------------------------------------------------------


def test_deit3_and_dinov2_are_taken_and_plan_the_graphed_step() -> None:
    assert fused_refusal(create_tore("deit3_small_patch16_224", pretrained=False)) is None  # AVE-ImageNet-v0's
    assert fused_refusal(_dinov2()) is None
    cfg = resolve_config(TrainConfig())
    assert plan_step(cfg, _deit3(), torch.device("cuda", 0)) == StepPlan(True, True)  # reads the device type
    assert plan_step(cfg, _deit3(drop_path_rate=0.1), torch.device("cuda", 0)) == StepPlan(False, False)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            dict(drop_path_rate=0.2),  # timm's rule: 0 at block 0, rising to 0.2 at the last
            "block 1's drop_path1 is DropPath(drop_prob=0.1), which the fused step does not compute; "
            "build the model with timm's drop_path_rate=0",
        ),
        (dict(attn_drop_rate=0.1), "block 0's attn.attn_drop is Dropout(p=0.1), .*timm's attn_drop_rate=0"),
        (dict(proj_drop_rate=0.2), "block 0's attn.proj_drop is Dropout(p=0.2), .*timm's proj_drop_rate=0"),
        (dict(scale_attn_norm=True), "block 0's attn.norm is a LayerNorm, .*timm's scale_attn_norm=False"),
        (dict(scale_mlp_norm=True), "block 0's mlp.norm is a LayerNorm, .*timm's scale_mlp_norm=False"),
        (dict(pos_drop_rate=0.1), "the ViT's pos_drop is Dropout(p=0.1), .*timm's pos_drop_rate=0"),
        (dict(drop_rate=0.3), "the ViT's head_drop is Dropout(p=0.3), .*timm's drop_rate=0"),
        (dict(pre_norm=True), "the ViT's norm_pre is a LayerNorm, .*timm's pre_norm=False"),
        (dict(fc_norm=True), "the ViT's fc_norm is a LayerNorm, .*timm's fc_norm=False"),
    ],
)
def test_refusals_name_the_attribute_its_value_and_the_fix(kw: dict, message: str) -> None:
    model = _deit3(**kw)
    pattern = message.replace("(", r"\(").replace(")", r"\)")
    assert re.fullmatch(pattern, str(fused_refusal(model))), fused_refusal(model)
    with pytest.raises(ValueError, match="the fused training step cannot run this model: " + pattern):
        FusedObjective(model, model.geometry(2))
    cfg = replace(resolve_config(TrainConfig()), fused_step="on")
    with pytest.raises(ValueError, match="--fused-step on: " + pattern + "; use --fused-step off"):
        plan_step(cfg, model, torch.device("cpu"))


def test_mlp_dropout_and_other_layer_scales_are_refused() -> None:
    model = _deit3()
    model.vit.blocks[2].mlp.drop2 = torch.nn.Dropout(0.5)
    assert fused_refusal(model) == (
        "block 2's mlp.drop2 is Dropout(p=0.5), which the fused step does not compute; "
        "build the model with timm's proj_drop_rate=0"
    )
    model = _deit3()
    model.vit.blocks[1].ls2 = torch.nn.Linear(32, 32)
    assert fused_refusal(model) == "block 1's ls2 is a Linear; the fused step computes timm's LayerScale only"
